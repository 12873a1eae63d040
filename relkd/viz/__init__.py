"""Figures of relations and of training: matplotlib ``Figure`` objects, no window, no pyplot.

Every function takes tensors or :class:`~relkd.graphs.RelationGraph` s (and label tensors) and
returns a :class:`matplotlib.figure.Figure`; :func:`save_figure` writes it. The numbers behind the
agreement figures come from :mod:`relkd.graphs.agreement`.

>>> fig = relation_matrices(student_emb, teacher_emb, labels, relation="normalized_distance")
>>> save_figure(fig, "figures/rkd_distance", formats=("png", "pdf"))
"""

from relkd.viz.agreement import agreement_bars, agreement_curves
from relkd.viz.curves import training_curves
from relkd.viz.matrices import relation_matrices
from relkd.viz.network import knn_graphs, register_layout
from relkd.viz.save import save_figure

__all__ = [
    "agreement_bars",
    "agreement_curves",
    "knn_graphs",
    "register_layout",
    "relation_matrices",
    "save_figure",
    "training_curves",
]
