r"""Block-shuffled images (Neyshabur, Sedghi & Zhang, "What is being transferred in transfer
learning?", NeurIPS 2020, Section 3.1): cut each image into ``k x k`` blocks and permute the blocks.

Small blocks destroy the visual features a network could reuse and keep low-level statistics; ``k =
1`` permutes pixels (all channels of a pixel together), ``k`` equal to the image size is the identity.
As in the authors' code (google-research/understanding-transfer-learning, ``libdata/utils.py``:
``RandomBlockShuffle``) one permutation, drawn from a seed, is applied to every image of a data set;
blocks are numbered row by row, and output block ``j`` is input block ``perm[j]``; ``k`` must divide
the image's height and width.

The paper *trains* on block-shuffled data (fine-tuned versus from scratch, per block size);
:func:`shuffle_robustness` instead evaluates one trained network on block-shuffled test images, the
cheaper question of how much of its accuracy rests on the spatial arrangement at each scale.
Normalisation is per channel, so shuffling before or after it gives the same images.

Shapes:
    images ``[..., C, H, W]`` -> the same shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from relkd.analysis._batches import device_of, evaluating, unpack

__all__ = ["block_permutation", "block_sizes", "block_shuffle", "shuffle_robustness"]


def block_sizes(height: int, width: int) -> list[int]:
    """Every ``k`` that divides both sides, ascending (``1`` ... ``gcd``)."""
    return [k for k in range(1, min(height, width) + 1) if height % k == 0 and width % k == 0]


def block_permutation(num_blocks: int, seed: int = 0) -> Tensor:
    """The permutation of ``num_blocks`` blocks drawn from ``seed`` (a generator of its own)."""
    return torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))


def block_shuffle(images: Tensor, k: int, *, seed: int = 0, perm: Tensor | None = None) -> Tensor:
    """``images`` with their ``k x k`` blocks permuted by ``perm`` (default :func:`block_permutation`
    with ``seed``), the same permutation for every image.

    Raises:
        ValueError: ``k`` does not divide the height and width, or ``perm`` is no permutation of the
            blocks.
    """
    if images.dim() < 3:
        raise ValueError(f"expected images [..., C, H, W], got shape {tuple(images.shape)}")
    *lead, c, h, w = images.shape
    if k < 1 or h % k or w % k:
        raise ValueError(
            f"block size {k} must divide the image size {h}x{w}; valid sizes: {block_sizes(h, w)}"
        )
    rows, cols = h // k, w // k
    n = rows * cols
    perm = block_permutation(n, seed) if perm is None else torch.as_tensor(perm)
    if perm.shape != (n,) or not torch.equal(perm.sort().values, torch.arange(n)):
        raise ValueError(f"perm must be a permutation of the {n} blocks, got {perm.tolist()}")
    blocks = images.reshape(*lead, c, rows, k, cols, k).transpose(-3, -2).reshape(*lead, c, n, k, k)
    blocks = blocks[..., perm.to(images.device), :, :]
    return blocks.reshape(*lead, c, rows, cols, k, k).transpose(-3, -2).reshape(images.shape)


@torch.no_grad()
def shuffle_robustness(
    model: nn.Module, loader: Iterable[Any], sizes: Sequence[int] | None = None, *, seed: int = 0
) -> dict[int, float]:
    """Top-1 accuracy (fraction of labelled instances) of ``model`` on ``loader``'s images
    block-shuffled with each block size (default every size that divides the images).

    One permutation per block size, from ``seed``, for the whole loader.
    """
    batches = list(loader)
    if not batches:
        raise ValueError("shuffle_robustness: the loader yielded no batch")
    h, w = unpack(batches[0])[0].shape[-2:]
    sizes = list(sizes) if sizes is not None else block_sizes(h, w)
    bad = [k for k in sizes if k < 1 or h % k or w % k]
    if bad:
        raise ValueError(
            f"block size {bad[0]} must divide the image size {h}x{w}; valid sizes: {block_sizes(h, w)}"
        )
    device = device_of(model)
    out = {}
    with evaluating(model):
        for k in sizes:
            perm = block_permutation((h // k) * (w // k), seed)
            hits = total = 0
            for batch in batches:
                x, y = unpack(batch)
                if y is None:
                    raise ValueError("shuffle_robustness needs labelled batches (a 'target' per image)")
                pred = model(block_shuffle(x.to(device), k, perm=perm)).argmax(1).cpu()
                keep = y.cpu() >= 0
                hits += int((pred == y.cpu())[keep].sum())
                total += int(keep.sum())
            out[k] = hits / total
    return out
