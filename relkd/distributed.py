r"""Data-parallel training with relations over the global batch.

Under ``torchrun`` each of the ``W`` processes (ranks) sees a shard of ``b`` examples of the global batch
of ``B = W b``. A relational loss computed on the shard relates ``b`` instances instead of ``B``, so its
value and its optimum depend on the GPU count. With *global relations* (on by default whenever a process
group of more than one rank is initialised) every relational loss first gathers the embeddings of all
ranks with :func:`all_gather`, which is differentiable, and builds its graph over the global batch.

Gradient convention. Every rank computes the same global loss :math:`L(X)`, :math:`X = [X_1; \dots;
X_W]`. The backward of :func:`all_gather` sums the incoming gradient over the ranks (an all-reduce) and
keeps this rank's rows, so the gradient reaching rank ``r``'s shard is

.. math::
    \sum_{q=1}^{W} \frac{\partial L}{\partial X_r} = W \, \frac{\partial L}{\partial X_r},

and DistributedDataParallel's average of the parameter gradients, :math:`\frac{1}{W} \sum_r W
\frac{\partial L}{\partial X_r} \frac{\partial X_r}{\partial \theta} = \frac{\partial L}{\partial
\theta}`, is exactly the single-process gradient on the concatenated batch. The same holds for losses
that average per-example terms over the local shard (cross-entropy, KD, the anchors of CRD and HKD):
rank ``r``'s gradient on its rows is ``W`` times the single-process gradient of the global-batch mean.
So, for every loss: *each rank's gradient on its own rows is* ``W`` *times the single-process gradient
for those rows*, and the average over ranks (DDP, or :func:`average_gradients`) is the single-process
parameter gradient. Losses over local anchors report their shard's value; :func:`reduce_mean` gives the
global-batch value for logging. HKD mixes both (local anchors, graph terms over the gathered batch): the
all-reduce adds every rank's contribution to a shard, and the statement holds for it too.

Shards must have the same size on every rank. relkd's training loaders give rank ``r`` the ``r``-th
contiguous ``1 / W`` of each global batch and never pad: a global batch that ``W`` does not divide is
given whole to every rank, which then computes that step alike with global relations off (see
:mod:`relkd.train.parallel`). :func:`all_gather` takes ``sizes`` for uneven shards; with
:func:`relkd.set_debug` on it checks the sizes and names them.

Integration note for a trainer under ``torchrun --nproc_per_node N -m relkd run CONFIG`` (what
:mod:`relkd.train.engine` does):

1. When ``WORLD_SIZE > 1``: ``torch.distributed.init_process_group("nccl" if cuda else "gloo")`` from
   the environment (``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR/PORT``;
   multi-node runs use its c10d rendezvous the same way), then ``torch.cuda.set_device(LOCAL_RANK)``
   and ``device = cuda:LOCAL_RANK``. Seed identically on every rank before building the networks and
   losses, or call :func:`broadcast_module` on the student and each loss module after building them
   (random bank initialisations must agree: the banks are then kept identical by the losses).
2. Batches: per-rank batch size = global batch size / ``W``; each rank takes its contiguous share of
   every global batch of the seeded per-epoch order, so the shards concatenated in rank order are the
   single-process batch, and augments each image with draws keyed to the image and the epoch, not to
   the rank. Every batch carries ``index`` (dataset indices) for the banks.
3. Student: ``DistributedDataParallel(student, device_ids=[LOCAL_RANK] or None)``. BatchNorm layers
   normalise each rank's shard by default; :func:`convert_global_batchnorm` makes them use the
   statistics of the global batch (two all-reduces per layer, on the CPU too, unlike
   ``nn.SyncBatchNorm``), which the engine does when ``train.sync_bn`` asks for it (by default
   whenever ``W > 1`` and a trained module has BatchNorm). Trainable loss
   modules (projections, GNN encoders, heads) are called through ``distill`` and other methods, not
   ``forward``, so DDP's forward hooks would not run: leave them unwrapped and call
   :func:`average_gradients` on ``loss.parameters()`` after ``backward`` and before ``optimizer.step()``
   (and before gradient clipping or unscaling). With gradient clipping rules that call
   ``torch.autograd.grad`` (``clip_to_ce``), DDP's hooks do not fire either: do not wrap the student;
   average the cross-entropy and the distillation gradients separately with :func:`all_reduce_mean_`,
   then apply the rule, so that it sees the global-batch gradients.
4. Teacher: the same checkpoint on every rank, in ``eval()`` mode, ``requires_grad_(False)``, run under
   ``torch.no_grad()``, never wrapped in DDP. A teacher trained in the same run is written by rank 0:
   call :func:`barrier` after the write and before any rank reads it.
5. Every rank runs every loss on every step (the losses hold collectives: a loss called on one rank
   only waits forever). Code that runs on rank 0 alone (evaluation, probes, plots) wraps loss calls in
   ``with global_relations(False):``. A step that shares one graph between several losses builds it
   with :func:`global_graph` (tensors passed to a loss are gathered by the loss itself). A check that
   may stop the run (a non-finite loss on one rank) is agreed on by every rank with one collective, so
   that all of them stop together instead of waiting on the others' next collective.
6. Rank 0 alone logs, writes checkpoints (``student.module.state_dict()`` and each loss's
   ``state_dict()``: banks are identical on every rank) and writes the result tables; log loss values
   averaged with :func:`reduce_mean`. Evaluate on rank 0 (or shard the test set and reduce the counts).
   ``destroy_process_group()`` at the end.

No function here transfers data to the host: each is one collective (plus the size check in debug
mode), and each is the identity (or a no-op) outside a process group of more than one rank.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from relkd._debug import is_debug
from relkd.graphs import RelationGraph, as_graph

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "is_main_process",
    "barrier",
    "all_gather",
    "reduce_mean",
    "all_reduce_mean_",
    "all_reduce_sum",
    "average_gradients",
    "broadcast_module",
    "set_global_relations",
    "global_relations_enabled",
    "global_relations",
    "global_graph",
    "is_global_graph",
    "GlobalBatchNorm1d",
    "GlobalBatchNorm2d",
    "GlobalBatchNorm3d",
    "convert_global_batchnorm",
    "has_batchnorm",
]

_global_relations: bool = True
# Graphs built over the global batch; a loss warns when handed any other graph under global relations.
_global_graphs: weakref.WeakSet[RelationGraph] = weakref.WeakSet()


def is_distributed() -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks ``W`` (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Whether this rank logs and writes files (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if is_distributed():
        dist.barrier()


class _AllGather(torch.autograd.Function):
    """Forward: concatenate every rank's shard. Backward: sum the gradient over ranks, keep our rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        ctx.sizes = sizes
        longest = max(sizes)
        if x.shape[0] < longest:
            # gloo needs equal-sized pieces: pad, gather, then drop the padding
            x = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x.contiguous())
        if longest == min(sizes):
            return torch.cat(parts)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # all_reduce rather than reduce_scatter: the gloo of older torch releases has no reduce_scatter
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: dist.get_rank()])
        return grad[start : start + ctx.sizes[dist.get_rank()]], None


def _check_sizes(x: torch.Tensor) -> None:
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    found = [int(s) for s in sizes]
    if len(set(found)) > 1:
        raise ValueError(
            f"all_gather: expected shards of the same size on every rank, got sizes {found}; shard with "
            "DistributedSampler (it pads the last batch) or pass sizes= for uneven shards"
        )


def all_gather(x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order; differentiable.

    The backward all-reduces (sums) the gradient and returns this rank's rows, so the gradient on a
    rank's shard is ``W`` times the single-process gradient of a loss that every rank computes on the
    gathered tensor (see the module docstring for why DDP's averaging then gives the exact gradient).
    Works with gloo and nccl. Outside a process group of more than one rank, returns ``x`` itself.

    Args:
        x: this rank's shard ``[b, ...]``.
        sizes: the shard size of every rank, for uneven shards (known to every rank, e.g. from the
            sampler); ``None`` requires equal shards (checked in debug mode, at the cost of a collective).

    Shapes:
        ``[b, ...]`` -> ``[W b, ...]`` (``[sum(sizes), ...]`` with ``sizes``).
    """
    if not is_distributed():
        return x
    if sizes is None:
        if is_debug():
            _check_sizes(x)
        sizes = (x.shape[0],) * world_size()
    else:
        sizes = tuple(int(n) for n in sizes)
        if len(sizes) != world_size() or sizes[rank()] != x.shape[0]:
            raise ValueError(
                f"all_gather: expected sizes with one entry per rank ({world_size()}) and "
                f"sizes[{rank()}] == {x.shape[0]} (this rank's shard), got {list(sizes)}"
            )
    return _AllGather.apply(x, sizes)


def reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks, detached (for logging shard-level values such as a loss).

    Shapes:
        any -> the same shape.
    """
    out = x.detach().clone()
    if is_distributed():
        dist.all_reduce(out)
        out /= world_size()
    return out


class _AllReduceSum(torch.autograd.Function):
    """Forward: the sum over ranks. Backward: the sum of the incoming gradients over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over ranks; differentiable, with the backward of :func:`all_gather`'s
    convention (the gradient is summed over ranks). ``x`` itself outside a process group of more than
    one rank.

    Shapes:
        any -> the same shape.
    """
    return _AllReduceSum.apply(x) if is_distributed() else x


@torch.no_grad()
def all_reduce_mean_(tensors: Iterable[torch.Tensor]) -> None:
    """Replace each tensor by its mean over ranks, in place, in one all-reduce per device and dtype.

    Every rank must pass tensors of the same shapes in the same order.
    """
    if not is_distributed():
        return
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for x in tensors:
        groups.setdefault((x.device, x.dtype), []).append(x)
    for group in groups.values():
        flat = torch.cat([x.reshape(-1) for x in group])
        dist.all_reduce(flat)
        flat /= world_size()
        for x, mean in zip(group, flat.split([x.numel() for x in group]), strict=True):
            x.copy_(mean.view_as(x))


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks: DDP's reduction, for modules not wrapped in DDP
    (the trainable parts of losses).

    Every rank must call it with the same parameters in the same order; parameters whose gradient is
    ``None`` are skipped, which is consistent when every rank runs the same losses.
    """
    all_reduce_mean_(p.grad for p in parameters if p.grad is not None)


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy ``module``'s parameters and buffers from rank ``src`` to every rank (in place)."""
    if not is_distributed():
        return
    for t in (*module.parameters(), *module.buffers()):
        dist.broadcast(t.data, src)


def set_global_relations(enabled: bool) -> None:
    """Turn global relations on (the default) or off for every loss in this process.

    Off, each rank relates only its own shard and updates banks with its own examples only, as most
    frameworks do; use it to reproduce them or for code that runs on one rank.
    """
    global _global_relations
    _global_relations = bool(enabled)


def global_relations_enabled() -> bool:
    """Whether losses gather over ranks: the switch is on and more than one rank is initialised."""
    return _global_relations and is_distributed()


@contextlib.contextmanager
def global_relations(enabled: bool) -> Iterator[None]:
    """Set global relations inside a ``with`` block and restore the previous setting after it."""
    previous = _global_relations
    set_global_relations(enabled)
    try:
        yield
    finally:
        set_global_relations(previous)


def global_graph(x: torch.Tensor | RelationGraph, *, detach: bool = False) -> RelationGraph:
    """The relation graph of the global batch: ``x`` gathered from every rank when global relations
    are enabled, else ``x``'s own graph.

    Build a graph that several losses share with this; the losses gather tensors themselves and take a
    graph as it is. A graph passes through unchanged (it already chose its nodes).

    Shapes:
        ``[b, ...]`` -> a graph of ``W b`` nodes (``b`` without global relations).
    """
    g = as_graph(x, detach=detach)
    if isinstance(x, RelationGraph):
        if not torch.compiler.is_compiling() and is_global_graph(x):
            _global_graphs.add(g)
        return g
    if global_relations_enabled():
        g = RelationGraph(all_gather(g.x))
        if not torch.compiler.is_compiling():
            _global_graphs.add(g)
    return g


def is_global_graph(graph: RelationGraph) -> bool:
    """Whether ``graph`` was built over the global batch by :func:`global_graph` (or a loss), in eager
    mode (the record is not kept while ``torch.compile`` traces)."""
    return graph in _global_graphs


class _GlobalStatistics:
    """Training-mode statistics over the global batch under global relations; else plain BatchNorm."""

    def forward(self, input: Tensor) -> Tensor:
        if self.training and global_relations_enabled():
            self._check_input_dim(input)
            return _global_batch_norm(self, input)
        return super().forward(input)


class GlobalBatchNorm1d(_GlobalStatistics, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics are those of the global batch (see
    :func:`convert_global_batchnorm`)."""


class GlobalBatchNorm2d(_GlobalStatistics, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of the global batch (see
    :func:`convert_global_batchnorm`)."""


class GlobalBatchNorm3d(_GlobalStatistics, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` whose training statistics are those of the global batch (see
    :func:`convert_global_batchnorm`)."""


_GLOBAL_BATCHNORM = {
    nn.BatchNorm1d: GlobalBatchNorm1d,
    nn.BatchNorm2d: GlobalBatchNorm2d,
    nn.BatchNorm3d: GlobalBatchNorm3d,
}


def convert_global_batchnorm(module: nn.Module) -> int:
    r"""Make every ``nn.BatchNorm1d/2d/3d`` inside ``module`` normalise with the statistics of the
    global batch in training mode; returns how many layers it converted.

    In place: each layer keeps its parameters, buffers, hooks and ``state_dict`` keys, only its class
    changes, so it can be done after taps and optimisers are set up and checkpoints load either way.
    The mean and the (biased) variance of each channel are summed over ranks with
    :func:`all_reduce_sum` in two passes, :math:`\mu = \sum_r S_r / N`,
    :math:`\sigma^2 = \sum_r \sum_{x \in r} (x - \mu)^2 / N` (``N`` images times positions over all
    ranks), and the running statistics are updated with the unbiased :math:`\sigma^2 N / (N - 1)`, as
    one process on the global batch does. The backward sums over ranks, so the gradient follows the
    convention of the module docstring. Outside global relations (one process, a replicated step,
    code on one rank) and in eval mode the layers are plain BatchNorm. Unlike ``nn.SyncBatchNorm`` it
    runs on the CPU (gloo) as well; other BatchNorm subclasses are left as they are.
    """
    converted = 0
    for m in module.modules():
        cls = _GLOBAL_BATCHNORM.get(type(m))
        if cls is not None:
            m.__class__ = cls
            converted += 1
    return converted


def has_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` holds a BatchNorm layer (of any kind)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # half precision is normalised in float32
    local = torch.cat([xf.sum(dims), xf.new_full((1,), xf.numel() // max(xf.shape[1], 1))])
    total = all_reduce_sum(local)
    count = total[-1].detach()
    mean = total[:-1] / count
    centred = xf - mean.view(shape)
    var = all_reduce_sum(centred.square().sum(dims)) / count
    out = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), factor)
            unbiased = var.detach() * count / (count - 1).clamp(min=1)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)
    return out.to(x.dtype)
