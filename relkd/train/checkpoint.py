"""Checkpoints: plain tensors and containers, written atomically, read with ``weights_only=True``.

A checkpoint is a dict of state dicts, numbers, strings and tensors (RNG states included, see
:mod:`relkd.train.seeding`), so loading it never unpickles arbitrary objects. It is written to a
temporary file and renamed over the old one, so an interrupted save leaves the previous checkpoint
whole. Reading a corrupted, truncated or foreign file, or loading a state dict into a module it does not
fit, raises :class:`CheckpointError` naming the file and the missing or unexpected keys.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CheckpointError", "load_checkpoint", "load_state", "save_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit what it is loaded into."""


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, required: Iterable[str] = ()) -> dict[str, Any]:
    """Read a checkpoint on the CPU with ``weights_only=True``.

    Args:
        path: the file.
        required: top-level keys it must hold.

    Raises:
        CheckpointError: the file is missing, unreadable (truncated, corrupted, not a checkpoint,
            or holding objects other than tensors and containers), or lacks a required key.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        reason = str(e).splitlines()[0].split(". ")[0] if str(e) else ""
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({type(e).__name__}: {reason}); it is truncated, "
            "corrupted or not a relkd checkpoint. Delete it to start that run over"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of states, got {type(state).__name__}")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: missing keys {missing} (it holds {sorted(state)}); it was not written by this "
            "version of relkd or for this kind of run"
        )
    return state


def load_state(path: str | Path, what: str, module: nn.Module, state: Mapping[str, Any]) -> None:
    """``module.load_state_dict(state)`` (strict), naming ``path``, ``what`` and the keys that differ.

    Raises:
        CheckpointError: missing or unexpected keys, or tensors of other shapes.
    """
    expected = set(module.state_dict())
    given = set(state)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the {what} state does not fit the {type(module).__name__} built from the config; "
            f"missing keys: {_short(missing)}; unexpected keys: {_short(unexpected)}. The checkpoint was "
            "written for another model or loss configuration"
        )
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: cannot load the {what} state: {e}") from e


def _short(keys: list[str], n: int = 8) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
