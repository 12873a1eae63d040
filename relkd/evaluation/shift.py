r"""Out-of-distribution accuracy on translated and rescaled copies of the test set: ``shift_scale``.

A network is judged on copies of the test images moved by whole pixels and zoomed about their centre,
as Abnar, Dehghani & Zuidema ("Transferring Inductive Biases through Knowledge Distillation",
arXiv:2006.00555) judge CNN and MLP students on translated and scaled MNIST (MNIST-C, Mu & Gilmer
2019; the authors' code pads MNIST to 40 x 40 for its ``mnist40`` task). Each transform is applied to
every test batch on the device and the network's top-1 accuracy on the whole transformed test set is
reported, in percent, with the mean over the transforms::

    evaluate:
      shift_scale: {translations: [[2, 0], [-2, 0], [0, 2], [0, -2]], scales: [0.8, 1.2]}

Columns ``shift_scale/dx{dx}_dy{dy}``, ``shift_scale/scale{s}`` and ``shift_scale/mean``.

* **Translation** by ``(dx, dy)`` pixels (right and down positive): ``out[y, x] = in[y - dy, x - dx]``,
  the uncovered border filled.
* **Scale** by ``s`` about the image centre :math:`c = ((H - 1)/2, (W - 1)/2)` (pixel centres):
  ``out[p] = in[c + (p - c) / s]`` with bilinear interpolation; a sample between the image and the
  outside mixes in the fill value. ``s > 1`` enlarges (the border is cut), ``s < 1`` shrinks.
* **Fill**: ``black`` (the default) is the value a pixel of 0 takes after the loader's normalisation,
  ``(0 - mean) / std`` per channel, read from the test set; ``min`` each image's smallest value; or a
  number in the network's input space.

**Shapes:** images ``[B, C, H, W]`` -> the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from relkd import distributed as D
from relkd.evaluation.base import EvalContext, register_evaluator

__all__ = ["ShiftScale", "rescale", "shift_scale_accuracy", "translate"]

Fill = str | float
TRANSLATIONS = ((2, 0), (-2, 0), (0, 2), (0, -2))
SCALES = (0.8, 1.2)


def _fill_tensor(images: Tensor, fill: float | Tensor) -> Tensor:
    """``fill`` broadcast to ``[B, C, 1, 1]`` (a number, ``[C]`` or ``[B, C, 1, 1]``)."""
    value = torch.as_tensor(fill, dtype=images.dtype, device=images.device)
    if value.dim() == 1:
        value = value.view(1, -1, 1, 1)
    return value.expand(images.shape[0], images.shape[1], 1, 1)


def translate(images: Tensor, dx: int, dy: int, fill: float | Tensor = 0.0) -> Tensor:
    """``images`` moved ``dx`` pixels right and ``dy`` down; the uncovered pixels take ``fill`` (a
    number, one value per channel ``[C]``, or ``[B, C, 1, 1]``).

    **Shapes:** ``[B, C, H, W]`` -> the same.
    """
    if images.dim() != 4:
        raise ValueError(f"translate: expected images [B, C, H, W], got {list(images.shape)}")
    if int(dx) != dx or int(dy) != dy:
        raise ValueError(f"translate: shifts are whole pixels, got dx={dx}, dy={dy}")
    dx, dy = int(dx), int(dy)
    h, w = images.shape[-2:]
    out = _fill_tensor(images, fill).expand_as(images).clone()
    if abs(dx) >= w or abs(dy) >= h:
        return out
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = images[
        ..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def rescale(images: Tensor, factor: float, fill: float | Tensor = 0.0) -> Tensor:
    """``images`` zoomed by ``factor`` about their centre with bilinear interpolation; samples outside
    the image read ``fill`` (as :func:`translate`).

    **Shapes:** ``[B, C, H, W]`` -> the same.
    """
    if images.dim() != 4:
        raise ValueError(f"rescale: expected images [B, C, H, W], got {list(images.shape)}")
    if not factor > 0:
        raise ValueError(f"rescale: the scale factor must be positive, got {factor}")
    b, c, h, w = images.shape
    # With align_corners=True, -1 and 1 are the centres of the first and last pixels, so the
    # identity grid divided by the factor samples c + (p - c) / factor.
    theta = torch.tensor([[1.0 / factor, 0.0, 0.0], [0.0, 1.0 / factor, 0.0]], dtype=images.dtype)
    grid = F.affine_grid(theta.to(images.device).expand(b, 2, 3), [b, c, h, w], align_corners=True)
    value = _fill_tensor(images, fill)
    shifted = F.grid_sample(images - value, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return shifted + value


def _black(loader: Any) -> Tensor:
    dataset = getattr(loader, "dataset", None)
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    if mean is None or std is None:
        raise ValueError(
            "shift_scale: fill 'black' needs the test set's normalisation (a dataset with mean and std); "
            "set fill to 'min' or to a number in the network's input space"
        )
    return -torch.as_tensor(mean, dtype=torch.float32) / torch.as_tensor(std, dtype=torch.float32)


@torch.no_grad()
def shift_scale_accuracy(
    model: nn.Module,
    loader: Iterable[dict[str, Tensor]],
    translations: Sequence[Sequence[int]] = TRANSLATIONS,
    scales: Sequence[float] = SCALES,
    fill: Fill = "black",
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> dict[str, float]:
    """Top-1 accuracy (%) of ``model`` in eval mode on every translated and rescaled copy of ``loader``,
    and their mean (see the module docstring for the names).

    Under data parallelism each rank counts its shard and the counts are summed over the ranks.

    Raises:
        ValueError: no transform, a translation that is not a pair of whole pixels, a scale <= 0, an
            unknown fill, a loader that yields nothing.
    """
    transforms = _transforms(translations, scales)
    if isinstance(fill, str) and fill not in ("black", "min"):
        raise ValueError(f"shift_scale: fill must be 'black', 'min' or a number, got {fill!r}")
    black = _black(loader) if fill == "black" else None
    device = next(iter(model.parameters()), torch.empty(0)).device
    counts = torch.zeros(len(transforms) + 1, device=device)
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            x, target = batch["input"].to(device), batch["target"].to(device)
            if fill == "min":
                value: float | Tensor = x.amin(dim=(1, 2, 3), keepdim=True).expand(-1, x.shape[1], 1, 1)
            else:
                value = black if black is not None else float(fill)
            for i, (_, apply) in enumerate(transforms):
                with autocast():
                    logits = model(apply(x, value))
                counts[i] += (logits.argmax(dim=1) == target).sum()
            counts[-1] += target.shape[0]
    finally:
        model.train(was_training)
    if D.is_distributed():
        dist.all_reduce(counts)
    total = float(counts[-1])
    if total == 0:
        raise ValueError("shift_scale: the test loader yielded no image")
    out = {name: 100.0 * float(counts[i]) / total for i, (name, _) in enumerate(transforms)}
    out["mean"] = sum(out.values()) / len(transforms)
    return out


def _transforms(
    translations: Sequence[Sequence[int]], scales: Sequence[float]
) -> list[tuple[str, Callable[[Tensor, Any], Tensor]]]:
    out: list[tuple[str, Callable[[Tensor, Any], Tensor]]] = []
    for pair in translations:
        if len(pair) != 2 or any(int(v) != v for v in pair):
            raise ValueError(f"shift_scale: a translation is a pair of whole pixels [dx, dy], got {pair!r}")
        dx, dy = int(pair[0]), int(pair[1])
        out.append((f"dx{dx}_dy{dy}", lambda x, v, dx=dx, dy=dy: translate(x, dx, dy, v)))
    for s in scales:
        if not s > 0:
            raise ValueError(f"shift_scale: scale factors must be positive, got {s}")
        out.append((f"scale{float(s):g}", lambda x, v, s=float(s): rescale(x, s, v)))
    if not out:
        raise ValueError("shift_scale: give at least one translation or scale")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"shift_scale: a transform is listed twice: {names}")
    return out


@register_evaluator("shift_scale")
class ShiftScale:
    """Evaluator: :func:`shift_scale_accuracy` of each deployed network on the test set.

    Args:
        translations: ``[dx, dy]`` pairs in pixels (default ``±2`` along each axis, for 28 x 28
            images; use ``±1`` on 8 x 8 digits).
        scales: zoom factors (default 0.8 and 1.2).
        fill: ``black``, ``min`` or a number (see the module docstring).
    """

    def __init__(
        self,
        translations: Sequence[Sequence[int]] = TRANSLATIONS,
        scales: Sequence[float] = SCALES,
        fill: Fill = "black",
    ) -> None:
        self.translations = [tuple(p) for p in translations]
        self.scales = [float(s) for s in scales]
        _transforms(self.translations, self.scales)
        if isinstance(fill, str) and fill not in ("black", "min"):
            raise ValueError(f"shift_scale: fill must be 'black', 'min' or a number, got {fill!r}")
        self.fill = fill

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        return shift_scale_accuracy(
            ctx.model, ctx.loaders["test"], self.translations, self.scales, self.fill, ctx.autocast
        )
