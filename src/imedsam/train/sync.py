"""What keeps the processes of a multi-process run one model: summed gradients, global-batch BatchNorm, the same
starting weights.

**Gradients: an explicit all-reduce, not DistributedDataParallel.** The loop never calls the system's
``forward``: objectives call several of its methods (``encode``, ``predict_low_res``, ``forward_train`` ...) and
SAM-Med2D's objective makes several optimizer steps per batch, one per pass, the later passes reaching only the
decoder. DDP's gradient hooks are armed by a ``forward`` of the wrapped module and expect one backward per
forward; wrapping the objective's computation in a module would tie every objective to that protocol.
:func:`reduce_gradients` instead runs after each ``backward``: one all-reduce of all trainable gradients,
flattened in one buffer together with the loss (so the logged loss is the global one without another
collective). The trainable set of a PEFT model is small (adapters and decoder), so the overlap of communication
with the backward pass that DDP's buckets give matters little here.

Unused parameters (DDP's ``find_unused_parameters``): which parameters received a gradient is exchanged first
over the host (gloo) group, from flags known on the host, so no device synchronisation is added. A parameter
that no process gave a gradient keeps ``grad = None`` and the optimizer skips it, as in a single process (e.g.
the I-MedSAM fine heads when no point was selected, the encoder adapters in SAM-Med2D's decoder-only passes); one
that only some processes used gets zeros from the others.

Convention: each process's loss is its share of the global-batch loss (:mod:`imedsam.train.shards`), so the sum
of the processes' gradients is the gradient of the global-batch loss, and the summed loss is that loss.

**BatchNorm** layers that learn from the batch (the implicit decoder's) normalise with the statistics of the
global batch (:func:`global_batchnorm`), as in one process, on every device (``torch.nn.SyncBatchNorm`` runs on
CUDA only).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from imedsam.train.distributed import DistContext


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes; the backward sums the incoming gradients over the processes too."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.detach().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.detach().clone().contiguous()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the processes, differentiable. The backward sums the gradients over the processes,
    which is right when the processes' losses sum to the loss that is minimised (the convention above): then
    the gradient of that loss with respect to the sum is the sum of the processes' gradients."""
    return _AllReduceSum.apply(tensor)


def reduce_gradients(params: list[nn.Parameter], loss: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum the gradients of ``params`` over the processes in place (module docstring) and return the loss summed
    over the processes (detached, on the device): one host all-reduce of used-flags, one device all-reduce."""
    used_here = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    dist.all_reduce(used_here, group=ctx.host_group)
    used = [p for p, flag in zip(params, used_here.tolist()) if flag]
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in used]
    flat = torch.cat([*parts, loss.detach().float().reshape(1).to(ctx.device)])
    dist.all_reduce(flat)
    start = 0
    for p in used:
        summed = flat[start:start + p.numel()].view_as(p)
        if p.grad is None:
            p.grad = summed.to(p.dtype, copy=True)
        else:
            p.grad.copy_(summed)
        start += p.numel()
    return flat[-1]


def broadcast_parameters(params: Iterable[nn.Parameter], ctx: DistContext) -> None:
    """Give every process rank 0's values of ``params`` (the starting weights; one broadcast per dtype)."""
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    with torch.no_grad():
        for group in by_dtype.values():
            flat = torch.cat([p.detach().reshape(-1) for p in group])
            dist.broadcast(flat, src=0)
            start = 0
            for p in group:
                p.copy_(flat[start:start + p.numel()].view_as(p))
                start += p.numel()


class GlobalBatchNormMixin:
    """BatchNorm over the global batch: in training, the mean and variance per channel come from the items of
    every process (two differentiable all-reduces: the sums, then the squared deviations), and the running
    statistics are updated with them exactly as ``nn.BatchNorm*`` does (unbiased variance, ``momentum``, or the
    cumulative average when ``momentum`` is None). In evaluation, or in a single process, the layer is the plain
    one. Every process must call the layer the same number of times per step (it holds a collective)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        bn: _BatchNorm = self  # type: ignore[assignment]  # mixed into a _BatchNorm
        batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        if not batch_stats or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)  # type: ignore[misc]
        bn._check_input_dim(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        x32 = x.float()
        sums = all_reduce_sum(torch.cat([x32.sum(dims), x32.new_tensor([float(x.numel() // channels)])]))
        count = sums[-1]
        mean = sums[:-1] / count
        centred = x32 - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dims)) / count
        y = centred * torch.rsqrt(var + bn.eps).view(shape)
        if bn.weight is not None:
            y = y * bn.weight.float().view(shape) + bn.bias.float().view(shape)
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                bn.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                bn.running_var.mul_(1 - factor).add_(var.detach() * count / (count - 1), alpha=factor)
        return y.to(x.dtype)


_GLOBAL_CLASSES: dict[type, type] = {}


def _global_class(cls: type) -> type:
    if cls not in _GLOBAL_CLASSES:
        _GLOBAL_CLASSES[cls] = type(f"Global{cls.__name__}", (GlobalBatchNormMixin, cls),
                                    {"__module__": __name__, "__doc__": GlobalBatchNormMixin.__doc__})
    return _GLOBAL_CLASSES[cls]


def global_batchnorm(module: nn.Module, skip: Iterable[str] = ()) -> list[str]:
    """Turn every BatchNorm layer of ``module`` into its global-batch version in place (the same object, the
    same parameters, buffers, hooks and ``isinstance``: only its class changes) except those inside the
    submodules named in ``skip`` (layers a system runs on a data-dependent part of the batch only, which must
    not hold a collective: :attr:`imedsam.models.base.SegmentationSystem.batch_conditional_modules`). Frozen
    layers pinned to their running statistics stay plain in effect. Returns the converted layers' names."""
    skipped = tuple(skip)
    converted = []
    for name, m in module.named_modules():
        if not isinstance(m, _BatchNorm) or isinstance(m, (GlobalBatchNormMixin, nn.SyncBatchNorm)):
            continue
        if any(name == s or name.startswith(s + ".") for s in skipped):
            continue
        m.__class__ = _global_class(type(m))
        converted.append(name)
    return converted
