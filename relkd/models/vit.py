r"""A small vision transformer, optionally with DeiT's distillation token: ``vit_tiny``, ``deit_tiny``.

Touvron, Cord, Douze, Massa, Sablayrolles & Jégou, "Training data-efficient image transformers &
distillation through attention", ICML 2021; official code github.com/facebookresearch/deit
(``models.py`` ``DistilledVisionTransformer``, built on timm's ``VisionTransformer``).

The image is cut into ``P x P`` patches, each linearly embedded (a convolution with kernel and stride
``P``) to ``dim`` channels. A learnt class token is put first and, in the distilled model, a learnt
distillation token second: the sequence is ``[cls, dist, patch_1 ... patch_N]`` and the learnt
position embedding has ``N + 2`` rows (``N + 1`` without the distillation token). ``depth`` pre-norm
blocks follow, :math:`x \leftarrow x + \mathrm{MHSA}(\mathrm{LN}(x))`, :math:`x \leftarrow x +
\mathrm{MLP}(\mathrm{LN}(x))` (GELU, hidden ``mlp_ratio * dim``, stochastic depth on both branches),
then a final LayerNorm. The class token's output goes through ``head``, the distillation token's
through ``head_dist``:

.. math::
    z_{cls} = W_{cls}\, \mathrm{LN}(x)_0 + b_{cls}, \qquad z_{dist} = W_{dist}\, \mathrm{LN}(x)_1 + b_{dist}

As in the official code: LayerNorm ``eps = 1e-6``, biases on the query/key/value projection, the
tokens, the position embedding and every linear layer initialised from a normal truncated to
:math:`\pm 2` with std 0.02 (timm's ``trunc_normal_``; biases 0), LayerNorms at scale 1 and shift 0.

Outputs. :meth:`VisionTransformer.forward_heads` returns ``(z_cls, z_dist)``; :meth:`forward`
returns the mean :math:`(z_{cls} + z_{dist}) / 2`, the official model's output at inference, so
that every evaluation reads the deployed classifier through ``model(x)``. Where we differ from the
authors: their ``forward`` returns the tuple in training mode; here it returns the mean in both modes
(a step that trains the two heads apart, :class:`relkd.methods.deit.DeiT`, calls ``forward_heads``),
so that the model is an ordinary classifier for every other step of the engine. Without the
distillation token (``vit_tiny``) ``forward`` is ``z_cls`` and ``forward_heads`` returns it twice.

Sizes. DeiT-Ti is ``dim = 192``, ``depth = 12``, ``heads = 3``, ``mlp_ratio = 4`` on 16 x 16 patches
of 224 x 224 images. The defaults here fit 8 x 8 digits and 28 x 28 Fashion-MNIST on a CPU: a
4 x 4 grid of patches (``patch_size`` = image side / 4: 2 pixels on digits, 7 on Fashion-MNIST),
``dim = 64``, ``depth = 4``, ``heads = 4``, ``mlp_ratio = 4``, stochastic depth 0.1 (``main.py``
``--drop-path``).

**Shapes:** input :math:`(B, C, H, W)`; ``forward`` :math:`(B, K)`; ``forward_heads`` two
:math:`(B, K)`; ``blocks.{i}`` (taps ``stage{i+1}``) :math:`(B, T, dim)` with ``T = N + 2`` tokens
(``N + 1`` without the distillation token); ``head:input`` (tap ``penultimate``) :math:`(B, dim)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relkd.models.zoo import register

__all__ = ["VisionTransformer", "deit_tiny", "vit_tiny"]

LN_EPS = 1e-6
INIT_STD = 0.02


def _trunc_normal(tensor: Tensor) -> None:
    nn.init.trunc_normal_(tensor, std=INIT_STD, a=-2.0, b=2.0)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., ECCV 2016): in training, zero a residual branch per sample with
    probability ``p`` and scale the kept ones by ``1 / (1 - p)``; the identity in eval mode."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention: one ``qkv`` projection (with bias), softmax over the keys scaled by
    ``1 / sqrt(dim / heads)``, an output projection ``proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """A pre-norm transformer block: attention, then a GELU MLP, each added back to its input."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """A ViT with a class token and, when ``distilled``, DeiT's distillation token and second head
    (see the module docstring).

    Args:
        in_shape: ``(C, H, W)`` of one image.
        num_classes: outputs of each head.
        patch_size: side of the square patches; it must divide ``H`` and ``W``. None: ``H // 4`` (a
            4 x 4 grid on square images).
        dim: token width.
        depth: number of blocks.
        heads: attention heads (they must divide ``dim``).
        mlp_ratio: hidden width of each block's MLP, in units of ``dim``.
        drop_path: stochastic depth rate of the last block, rising linearly from 0 at the first
            (timm's rule).
        distilled: add the distillation token and ``head_dist``.

    Attributes:
        num_patches: ``N``, the number of patch tokens.
        num_tokens: tokens before the patches: 2 with the distillation token, else 1.
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        patch_size: int | None = None,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.1,
        distilled: bool = True,
    ) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(f"expected in_shape (C, H, W), got {tuple(in_shape)}")
        channels, height, width = (int(s) for s in in_shape)
        if patch_size is None:
            patch_size = height // 4
        if patch_size < 1 or height % patch_size or width % patch_size:
            raise ValueError(
                f"patch_size {patch_size} must divide the image's height and width, got {height} x {width}; "
                "set args.patch_size"
            )
        if depth < 1 or dim < 1 or heads < 1 or dim % heads:
            raise ValueError(
                f"expected depth >= 1 and heads dividing dim, got depth {depth}, dim {dim}, heads {heads}"
            )
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.patch_size, self.distilled = patch_size, distilled
        self.num_patches = (height // patch_size) * (width // patch_size)
        self.num_tokens = 2 if distilled else 1
        self.patch_embed = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + self.num_tokens, dim))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, r) for r in rates))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.head = nn.Linear(dim, num_classes)
        self.head_dist = nn.Linear(dim, num_classes) if distilled else None
        self.default_taps = {f"stage{i + 1}": f"blocks.{i}" for i in range(depth)}
        self.default_taps.update({"feature_map": f"blocks.{depth - 1}", "penultimate": "head:input"})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation (see the module docstring)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _trunc_normal(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.dist_token, self.pos_embed):
            if p is not None:
                _trunc_normal(p)

    def forward_features(self, x: Tensor) -> Tensor:
        """The normalised tokens after the last block, ``[B, T, dim]`` (class token first)."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            tokens.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*tokens, x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward_heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z_cls, z_dist)``: the class head on the class token, the distillation head on the
        distillation token (``z_cls`` twice without it)."""
        tokens = self.forward_features(x)
        z_cls = self.head(tokens[:, 0])
        if self.head_dist is None:
            return z_cls, z_cls
        return z_cls, self.head_dist(tokens[:, 1])

    def forward(self, x: Tensor) -> Tensor:
        z_cls, z_dist = self.forward_heads(x)
        return z_cls if self.head_dist is None else (z_cls + z_dist) / 2

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, num_patches={self.num_patches}, distilled={self.distilled}"


def _tiny(distilled: bool):
    def build(
        num_classes: int = 10,
        in_shape: Sequence[int] = (1, 8, 8),
        patch_size: int | None = None,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.1,
    ) -> VisionTransformer:
        return VisionTransformer(
            in_shape, num_classes, patch_size, dim, depth, heads, mlp_ratio, drop_path, distilled
        )

    return build


deit_tiny = register("deit_tiny")(_tiny(distilled=True))
deit_tiny.__doc__ = "A small :class:`VisionTransformer` with DeiT's distillation token and second head."
vit_tiny = register("vit_tiny")(_tiny(distilled=False))
vit_tiny.__doc__ = "The same :class:`VisionTransformer` without the distillation token (one head)."
