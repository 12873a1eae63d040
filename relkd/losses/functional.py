"""Functional forms of every loss: pure math on tensors or RelationGraphs."""

from relkd.losses.cc import correlation_congruence
from relkd.losses.crd import crd
from relkd.losses.hkd import hkd
from relkd.losses.kd import kd
from relkd.losses.kdsvd import kd_svd
from relkd.losses.mhgd import mhgd, mhgd_pretrain
from relkd.losses.pkt import pkt
from relkd.losses.rkd import rkd_angle, rkd_distance
from relkd.losses.sp import similarity_preserving

__all__ = [
    "kd",
    "rkd_distance",
    "rkd_angle",
    "similarity_preserving",
    "correlation_congruence",
    "pkt",
    "hkd",
    "crd",
    "kd_svd",
    "mhgd",
    "mhgd_pretrain",
]
