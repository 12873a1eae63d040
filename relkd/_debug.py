"""Opt-in checks for non-finite values (off by default: each check syncs the GPU)."""

from __future__ import annotations

import torch

_DEBUG = False


def set_debug(enabled: bool = True) -> None:
    """Turn on checks that raise, naming the loss, when an input or a loss value is not finite."""
    global _DEBUG
    _DEBUG = bool(enabled)


def is_debug() -> bool:
    return _DEBUG


def check_finite(name: str, what: str, tensor: torch.Tensor) -> None:
    """Raise ``FloatingPointError`` if debug mode is on and ``tensor`` holds NaN or inf."""
    if _DEBUG and not bool(torch.isfinite(tensor).all()):
        raise FloatingPointError(f"{name}: {what} contains NaN or inf")
