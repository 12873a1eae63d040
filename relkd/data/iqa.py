r"""``synthetic_iqa``: a SYNTHETIC degraded-reference image-quality benchmark made offline from Fashion-MNIST.

Degraded-reference IQA (Zheng et al., "Learning Conditional Knowledge Distillation for
Degraded-Reference Image Quality Assessment", ICCV 2021) scores a *restored* image given the
*degraded* image the restoration started from; the pristine image is known only while training. The
real benchmark (PIPAL, human Elo scores) is not available offline, so this one is made here, with
labels computed, not judged by people:

* **references**: Fashion-MNIST images (28x28 grey), ``train_references`` from its training split
  and ``test_references`` from its test split (a permutation seeded with ``seed``), so no test
  reference is seen in training;
* **degradations** of each reference (:data:`DEGRADATIONS`): Gaussian blur (radius 1.0 and 1.6),
  additive Gaussian noise (std 0.08 and 0.16 of the pixel range, seeded per image), JPEG compression
  (quality 30 and 10), all with Pillow;
* **restorations** of each degraded image by standard filters (:data:`RESTORATIONS`): none, 3x3 median,
  Gaussian blur (radius 0.7), the 3x3 smoothing kernel, unsharp masking, median then unsharp masking;
* **quality label** of a restored image: its SSIM to the pristine reference (:func:`ssim`, Wang et al.
  2004, computed here in float64). The labels are synthetic: a full-reference metric, not human
  opinion.

Each reference gives 6 x 6 = 36 restored images. An item (``view="degraded"``, the DR-IQA setting)::

    input      [2, 28, 28]  (restored, degraded), normalised     what the deployed model sees
    reference  [1, 28, 28]  the pristine image, normalised       privileged (training only)
    pair       [2, 28, 28]  (restored, degraded) of another item with the same reference
    score, pair_score       SSIM of the restored image and of the pair's (float32)
    group                   the reference's id; target -1 (no class); index

``view="reference"`` puts the pristine image in ``input`` instead of the degraded one: the
full-reference upper bound. The pair is redrawn every epoch (:meth:`IQADataset.for_epoch`, seeded by
the loader), as the CKDN authors draw a second restoration of the same reference per item. Both
channels are normalised with Fashion-MNIST's mean and std. Served by a torch ``DataLoader`` (the items
carry more than the in-memory loader's keys); nothing is augmented.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import Tensor
from torch.utils.data import Dataset

from relkd.data.bundle import DataBundle
from relkd.data.registry import build, register

__all__ = [
    "DEGRADATIONS",
    "RESTORATIONS",
    "IQADataset",
    "gaussian_window",
    "ssim",
    "swap_reference",
    "synthetic_iqa",
]

MEAN, STD = 0.2860, 0.3530
VIEWS = ("degraded", "reference")
Filter = Callable[[Image.Image], Image.Image]


def _blur(radius: float) -> Callable[[Image.Image, np.random.Generator], Image.Image]:
    return lambda img, rng: img.filter(ImageFilter.GaussianBlur(radius))


def _noise(std: float) -> Callable[[Image.Image, np.random.Generator], Image.Image]:
    def apply(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        pixels = np.asarray(img, dtype=np.float64) + rng.normal(
            0.0, 255.0 * std, size=(img.height, img.width)
        )
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))

    return apply


def _jpeg(quality: int) -> Callable[[Image.Image, np.random.Generator], Image.Image]:
    def apply(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("L")

    return apply


def _then(*filters: ImageFilter.Filter) -> Filter:
    def apply(img: Image.Image) -> Image.Image:
        for f in filters:
            img = img.filter(f)
        return img

    return apply


DEGRADATIONS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "blur1.0": _blur(1.0),
    "blur1.6": _blur(1.6),
    "noise0.08": _noise(0.08),
    "noise0.16": _noise(0.16),
    "jpeg30": _jpeg(30),
    "jpeg10": _jpeg(10),
}
RESTORATIONS: dict[str, Filter] = {
    "none": lambda img: img.copy(),
    "median3": _then(ImageFilter.MedianFilter(3)),
    "gaussian0.7": _then(ImageFilter.GaussianBlur(0.7)),
    "smooth": _then(ImageFilter.SMOOTH),
    "unsharp": _then(ImageFilter.UnsharpMask(radius=1, percent=120, threshold=0)),
    "median_unsharp": _then(
        ImageFilter.MedianFilter(3), ImageFilter.UnsharpMask(radius=1, percent=120, threshold=0)
    ),
}


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float64) -> Tensor:
    """The ``[size, size]`` Gaussian weights, :math:`\\propto \\exp(-(i^2 + j^2) / 2\\sigma^2)`, sum 1."""
    if size < 1 or sigma <= 0:
        raise ValueError(f"expected a window size >= 1 and sigma > 0, got {size} and {sigma}")
    r = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    w = g[:, None] * g[None, :]
    return w / w.sum()


def ssim(
    x: Tensor,
    y: Tensor,
    window: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    r"""Structural similarity (Wang, Bovik, Sheikh & Simoncelli, IEEE TIP 2004) of each image pair.

    .. math::
        \mathrm{SSIM} = \operatorname{mean}_{\text{windows}}
            \frac{(2\mu_x\mu_y + C_1)(2\sigma_{xy} + C_2)}
                 {(\mu_x^2 + \mu_y^2 + C_1)(\sigma_x^2 + \sigma_y^2 + C_2)},
        \qquad C_1 = (k_1 L)^2,\; C_2 = (k_2 L)^2,

    with Gaussian-weighted local means, variances and covariance (:math:`\sigma_x^2 = \overline{x^2} -
    \mu_x^2`, weights summing to 1) over every ``window`` x ``window`` position inside the image (the
    authors' reference implementation filters with ``'valid'``), averaged over positions and channels.
    Defaults are the authors': an 11x11 window of std 1.5, :math:`k_1 = 0.01`, :math:`k_2 = 0.03`,
    :math:`L` the data range (1 for pixels in [0, 1]).

    **Shapes:** ``x``, ``y`` ``[B, C, H, W]`` with ``H, W >= window`` -> ``[B]``.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"expected two image batches of one shape [B, C, H, W], got {list(x.shape)} and {list(y.shape)}"
        )
    if min(x.shape[-2:]) < window:
        raise ValueError(
            f"images of {list(x.shape[-2:])} pixels are smaller than the {window}x{window} window"
        )
    # The window is the outer product of a 1-D Gaussian with itself, so filtering every valid position
    # is A t A^T with A the banded [H - window + 1, H] matrix of the 1-D weights (and likewise for W).
    g = gaussian_window(window, sigma, x.dtype)[window // 2].to(x.device)
    g = g / g.sum()

    def band(n: int) -> Tensor:
        a = torch.zeros(n - window + 1, n, dtype=x.dtype, device=x.device)
        for i in range(n - window + 1):
            a[i, i : i + window] = g
        return a

    a_h, a_w = band(x.shape[-2]), band(x.shape[-1])

    def local(t: Tensor) -> Tensor:
        *lead, h, w = t.shape
        cols = t.reshape(-1, w) @ a_w.T  # two plain matrix products over the whole batch
        rows = cols.reshape(-1, h, a_w.shape[0]).transpose(1, 2).reshape(-1, h) @ a_h.T
        return (
            rows.reshape(-1, a_w.shape[0], a_h.shape[0])
            .transpose(1, 2)
            .reshape(*lead, a_h.shape[0], a_w.shape[0])
        )

    mu_x, mu_y = local(x), local(y)
    var_x = local(x * x) - mu_x**2
    var_y = local(y * y) - mu_y**2
    cov = local(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(1)


def swap_reference(inputs: Tensor, reference: Tensor) -> Tensor:
    """``inputs`` with its last channels (as many as ``reference`` has) replaced by ``reference``: an item's
    (restored, degraded) becomes (restored, pristine), the privileged full-reference view.

    **Shapes:** inputs ``[B, C, H, W]``, reference ``[B, c, H, W]`` with ``c < C`` -> ``[B, C, H, W]``.
    """
    c = reference.shape[1] if reference.dim() == 4 else 0
    if (
        reference.dim() != 4
        or reference.shape[0] != inputs.shape[0]
        or reference.shape[2:] != inputs.shape[2:]
        or not 0 < c < inputs.shape[1]
    ):
        raise ValueError(
            f"expected a reference [B, c, H, W] with fewer channels than the inputs {list(inputs.shape)}, "
            f"got {list(reference.shape)}"
        )
    return torch.cat([inputs[:, :-c], reference], dim=1)


def _pil(image: Tensor) -> Image.Image:
    return Image.fromarray(image[0].numpy())


def _tensor(image: Image.Image) -> Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8))[None]


def _make_split(references: Tensor, seed: int) -> dict[str, Tensor]:
    """Degrade and restore every reference (``[R, 1, H, W]`` uint8); SSIM labels."""
    rng = np.random.default_rng(seed)
    degraded, restored, degraded_of, reference_of = [], [], [], []
    for r, ref in enumerate(references):
        for degrade in DEGRADATIONS.values():
            d = degrade(_pil(ref), rng)
            degraded.append(_tensor(d))
            for restore in RESTORATIONS.values():
                restored.append(_tensor(restore(d)))
                degraded_of.append(len(degraded) - 1)
                reference_of.append(r)
    restored_t = torch.stack(restored)
    reference_of_t = torch.tensor(reference_of)
    scores = ssim(restored_t.double() / 255, references[reference_of_t].double() / 255)
    return {
        "restored": restored_t,
        "degraded": torch.stack(degraded),
        "references": references.clone(),
        "degraded_of": torch.tensor(degraded_of),
        "reference_of": reference_of_t,
        "score": scores.float(),
    }


class IQADataset(Dataset):
    """Restored images with their degraded and pristine images and SSIM labels (see the module docstring).

    Args:
        parts: ``restored [N, 1, H, W]``, ``degraded [M, 1, H, W]``, ``references [R, 1, H, W]`` (uint8),
            ``degraded_of [N]``, ``reference_of [N]`` (int64), ``score [N]`` (float32).
        view: ``degraded`` (input = restored and degraded) or ``reference`` (restored and pristine).
        positions: the items of ``parts`` this dataset holds (default all).
    """

    max_value = 255.0

    def __init__(
        self, parts: dict[str, Tensor], view: str = "degraded", positions: Tensor | None = None
    ) -> None:
        if view not in VIEWS:
            raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")
        self.parts, self.view = parts, view
        self.indices = torch.arange(len(parts["restored"])) if positions is None else positions.long()
        self.targets = torch.full_like(self.indices, -1)
        self.mean, self.std = (MEAN, MEAN), (STD, STD)
        self.augment = False
        self.partner = self.indices.clone()

    def __len__(self) -> int:
        return self.indices.numel()

    @property
    def scores(self) -> Tensor:
        """``[N]`` the items' SSIM labels."""
        return self.parts["score"][self.indices]

    @property
    def groups(self) -> Tensor:
        """``[N]`` the items' reference ids."""
        return self.parts["reference_of"][self.indices]

    def _image(self, images: Tensor, i: Tensor) -> Tensor:
        return (images[i].float() / self.max_value - MEAN) / STD

    def _input(self, item: int) -> Tensor:
        p = self.parts
        second = (
            p["degraded"][p["degraded_of"][item]]
            if self.view == "degraded"
            else p["references"][p["reference_of"][item]]
        )
        return (torch.cat([p["restored"][item], second]).float() / self.max_value - MEAN) / STD

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item, other = int(self.indices[i]), int(self.partner[i])
        p = self.parts
        return {
            "input": self._input(item),
            "reference": self._image(p["references"], p["reference_of"][item]),
            "pair": self._input(other),
            "score": p["score"][item],
            "pair_score": p["score"][other],
            "group": p["reference_of"][item],
            "target": self.targets[i],
            "index": self.indices[i],
        }

    def for_epoch(self, seed: int) -> IQADataset:
        """A view whose pairs are redrawn from ``seed``: each item's pair is the next item in a random
        order of the items of its reference (itself when it is the only one)."""
        out = copy.copy(self)
        generator = torch.Generator().manual_seed(seed)
        groups = self.groups
        n = len(self)
        # A random order of the items, grouped by reference; each item's pair is the next one of its group.
        order = torch.argsort(groups.double() + torch.rand(n, generator=generator, dtype=torch.float64))
        grouped = groups[order]
        first = torch.ones(n, dtype=torch.bool)
        first[1:] = grouped[1:] != grouped[:-1]
        last = torch.ones(n, dtype=torch.bool)
        last[:-1] = first[1:]
        group_start = torch.cummax(torch.where(first, torch.arange(n), 0), 0).values
        nxt = torch.where(last, order[group_start], torch.roll(order, -1))
        partner = torch.empty_like(order)
        partner[order] = self.indices[nxt]
        out.partner = partner
        return out

    def subset(self, positions: Tensor, hide_labels: bool = False) -> IQADataset:
        """The items at ``positions`` (``hide_labels`` changes nothing: there are no class labels)."""
        return IQADataset(self.parts, self.view, self.indices[positions])

    def with_augment(self, augment: bool) -> IQADataset:
        """The same items (nothing is augmented)."""
        out = copy.copy(self)
        out.augment = augment
        return out

    def __repr__(self) -> str:
        return (
            f"IQADataset(n={len(self)}, references={int(self.groups.unique().numel())}, view={self.view!r})"
        )


@register("synthetic_iqa")
def synthetic_iqa(
    root: str | Path | None = None,
    augment: bool = True,
    train_references: int = 300,
    test_references: int = 100,
    view: str = "degraded",
    seed: int = 0,
) -> DataBundle:
    """The synthetic DR-IQA benchmark (module docstring) made from Fashion-MNIST found at ``root`` (or
    where ``fashion_mnist`` looks); ``augment`` is unused (nothing is augmented)."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")
    source = build("fashion_mnist", root=root, augment=False)
    splits = {}
    for name, dataset, count, stream in (
        ("train", source.train, train_references, 0),
        ("test", source.test, test_references, 1),
    ):
        if not 1 <= count <= len(dataset):
            raise ValueError(f"{name}_references must be between 1 and {len(dataset)}, got {count}")
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 2 + stream))
        splits[name] = IQADataset(_make_split(dataset.images[order[:count]], seed * 2 + stream), view)
    train = splits["train"]
    return DataBundle(
        name="synthetic_iqa",
        train=train,
        test=splits["test"],
        num_classes=1,
        in_channels=2,
        image_size=tuple(train.parts["restored"].shape[-2:]),
        train_targets=train.targets.clone(),
        mean=train.mean,
        std=train.std,
    )
