"""Distillation losses: ``nn.Module`` forms here, functional forms in ``relkd.losses.functional``.

Build any loss by name with :func:`build`; :func:`available` lists the names.
"""

from relkd.losses import functional
from relkd.losses.base import DistillLoss
from relkd.losses.cc import CCLoss
from relkd.losses.crd import CRDLoss
from relkd.losses.hkd import HKDLoss
from relkd.losses.kd import KDLoss
from relkd.losses.kdsvd import KDSVDLoss
from relkd.losses.mhgd import MHGDLoss
from relkd.losses.pkt import PKTLoss
from relkd.losses.registry import LOSSES, available, build, register
from relkd.losses.rkd import RKDLoss
from relkd.losses.sp import SPLoss

__all__ = [
    "DistillLoss",
    "KDLoss",
    "RKDLoss",
    "SPLoss",
    "CCLoss",
    "PKTLoss",
    "LOSSES",
    "available",
    "build",
    "register",
    "functional",
    "HKDLoss",
    "CRDLoss",
    "KDSVDLoss",
    "MHGDLoss",
]
