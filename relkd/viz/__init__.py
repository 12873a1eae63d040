"""Figures of relations and of training: matplotlib ``Figure`` objects, no window, no pyplot.

Every function takes tensors or :class:`~relkd.graphs.RelationGraph` s (and label tensors) and
returns a :class:`matplotlib.figure.Figure`; :func:`save_figure` writes it. The numbers behind the
agreement figures come from :mod:`relkd.graphs.agreement`.

>>> fig = relation_matrices(student_emb, teacher_emb, labels, relation="normalized_distance")
>>> save_figure(fig, "figures/rkd_distance", formats=("png", "pdf"))
"""

from relkd.viz.agreement import agreement_bars, agreement_curves
from relkd.viz.analysis import (
    MISTAKE_KINDS,
    criticality_grid,
    criticality_map,
    interpolation_curves,
    layer_cka_heatmaps,
    metric_table,
    mistakes_bars,
    robustness_curves,
)
from relkd.viz.curves import training_curves
from relkd.viz.matrices import relation_matrices
from relkd.viz.network import knn_graphs, register_layout
from relkd.viz.save import save_figure

__all__ = [
    "MISTAKE_KINDS",
    "agreement_bars",
    "agreement_curves",
    "criticality_grid",
    "criticality_map",
    "interpolation_curves",
    "knn_graphs",
    "layer_cka_heatmaps",
    "metric_table",
    "mistakes_bars",
    "register_layout",
    "relation_matrices",
    "robustness_curves",
    "save_figure",
    "training_curves",
]
