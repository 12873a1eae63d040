"""What is shared between two networks, and what a trained network rests on: numbers and tensors
(no figures; :mod:`relkd.viz.analysis` draws them, ``relkd analyze`` runs them on a finished run).

* Representations: :func:`cka` (linear/RBF, debiased), :class:`MinibatchCKA` and :func:`layer_cka`
  (Nguyen et al.'s minibatch estimator over a whole data set, every layer of one network against every
  layer of another), :func:`rsa` (Abnar et al.'s second-order similarity).
* Predictions: :func:`topk_agreement`, :func:`prediction_kl`, :func:`mistakes` (common and uncommon
  mistakes), :func:`predict`.
* Weights (Neyshabur et al., "What is being transferred in transfer learning?", NeurIPS 2020):
  :func:`interpolate` (the performance barrier between two networks, BatchNorm statistics recomputed),
  :func:`module_criticality`, :func:`parameter_distance`.
* Inputs: :func:`block_shuffle` and :func:`shuffle_robustness`.

>>> from relkd.analysis import layer_cka, interpolate
>>> result = layer_cka(teacher, student, test_loader)     # taps: stage1.., penultimate, logits
>>> result.matrix.shape
torch.Size([5, 5])
>>> interpolate(net_a, net_b, [0.25, 0.5, 0.75], test_loader, bn_loader=train_loader).barrier
"""

from relkd.analysis._batches import LOGITS, evaluate_error, features
from relkd.analysis.block_shuffle import block_permutation, block_shuffle, block_sizes, shuffle_robustness
from relkd.analysis.cka import LayerCKA, MinibatchCKA, cka, layer_cka, layer_taps
from relkd.analysis.criticality import ALPHAS, SIGMAS, ModuleCriticality, module_criticality
from relkd.analysis.distance import module_parameters, parameter_distance
from relkd.analysis.interpolation import (
    BN_MODES,
    InterpolationCurve,
    has_batchnorm,
    interpolate,
    interpolate_state,
    recompute_batchnorm,
)
from relkd.analysis.predictions import (
    Mistakes,
    error_rate,
    mistakes,
    predict,
    prediction_kl,
    topk_agreement,
)
from relkd.analysis.rsa import rsa, second_order_similarity

__all__ = [
    "ALPHAS",
    "BN_MODES",
    "LOGITS",
    "SIGMAS",
    "InterpolationCurve",
    "LayerCKA",
    "MinibatchCKA",
    "Mistakes",
    "ModuleCriticality",
    "block_permutation",
    "block_shuffle",
    "block_sizes",
    "cka",
    "error_rate",
    "evaluate_error",
    "features",
    "has_batchnorm",
    "interpolate",
    "interpolate_state",
    "layer_cka",
    "layer_taps",
    "module_criticality",
    "module_parameters",
    "mistakes",
    "parameter_distance",
    "predict",
    "prediction_kl",
    "recompute_batchnorm",
    "rsa",
    "second_order_similarity",
    "shuffle_robustness",
    "topk_agreement",
]
