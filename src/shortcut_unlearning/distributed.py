"""Data parallelism over processes (torchrun), equal to one process up to floating point.

Launched by `torchrun --nproc-per-node N ...`, every process (rank) holds the whole data set
and the same model, draws the same batch rows from the same seeded generator, and computes
the forward and backward pass of its own part of those rows (`shard`). After backward the
scope's gradients are summed over the ranks (`all_reduce_gradients`), so every rank holds the
gradient one process would have computed on the whole batch, and everything after it
(gradient clipping, projections, weight decay, the optimiser, the certified operators' noise
from a generator seeded alike on every rank) runs identically on every rank: the ranks never
drift apart, and no weights are ever broadcast.

For the summed gradients to be the one-process gradient, each rank's loss must be its share
of the one-process loss, not a loss of its own rows:

* Means with a data-dependent denominator (cross-entropy over the labelled pixels) are the
  local sum divided by the global count (`mean_cross_entropy`).
* Terms pooled over the batch (the soft Dice's overlap and sizes) use the global sums of the
  pooled statistics (`global_sums`): their value is the global sum, their gradient flows to
  this rank's part only, so the loss's value is the one-process value on every rank and its
  gradient is this rank's share.
* A per-pixel term the operator reduces itself (the forget CE) is gathered from all ranks
  (`gather_shares`), with gradient only through this rank's own pixels.
* Batch norm in train mode normalises with the statistics of the whole batch, pooled over the
  ranks (`pooled_batch_norms`); torch.nn.SyncBatchNorm does this on GPUs only, and our loops
  call the decoder and head directly, so this module does it on gloo and NCCL alike.

Why not torch.nn.parallel.DistributedDataParallel: DDP reduces gradients from hooks installed
by the wrapped module's forward, and our loops never call the wrapped network as a whole
(they call the scope's blocks on cached encoder features, model.scoped_forward). DDP also
averages gradients, which is exact only for per-rank means over equal shares. One flat
all-reduce of the scope's gradients per step is what DDP would do, without its bucketing.

Decisions that must agree on every rank (validation scores for early stopping, the probe's
metrics for the collapse check, the ranked choice of refined images) are computed on rank 0
and broadcast (`from_main`): recomputing them on every rank would usually agree, but on GPUs
different kernels may be picked per device, and one tie broken differently would send the
ranks down different paths until a collective hangs.

In one process (no torchrun, or a world of 1) every helper returns its input unchanged and
the loops take exactly the steps they take without this module.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

T = TypeVar("T")


# -- who we are --------------------------------------------------------------------------------
def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0, the one process that prints, shows progress and writes files."""
    return rank() == 0


def launched() -> bool:
    """Whether torchrun (or a Slurm script around it) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> bool:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL on CUDA, each rank on cuda:LOCAL_RANK, else
    gloo on the CPU. Nothing happens in one process or when the group already exists; True
    when this call made the group."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    kind, _, index = device.partition(":")
    if index:
        raise ValueError(
            f"--device {device} names one GPU, but under torchrun each process takes "
            "cuda:LOCAL_RANK: pass --device auto or cuda"
        )
    if kind == "mps":
        raise ValueError("torch.distributed does not run on mps; pass --device cpu")
    cuda = kind in ("auto", "cuda") and torch.cuda.is_available()
    if kind == "cuda" and not cuda:
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    if cuda:  # "cuda" and "auto" then mean this rank's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # long enough for rank 0 to evaluate while the others wait at the next collective
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=1))
    return True


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- rows --------------------------------------------------------------------------------------
def shards(rows: np.ndarray) -> list[np.ndarray]:
    """The rows of a batch split into `world()` contiguous parts, in rank order (a part may be
    empty when the batch holds fewer rows than there are ranks)."""
    return np.array_split(np.asarray(rows), world())


def shard(rows: np.ndarray) -> np.ndarray:
    """This rank's part of a batch's rows; all of them in one process."""
    return rows if world() == 1 else shards(rows)[rank()]


# -- sums over ranks ---------------------------------------------------------------------------
def global_sums(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor summed over the ranks (one all-reduce for all of them, in float64).

    The value is the global sum on every rank; the gradient flows to this rank's tensor only,
    as if the other ranks' parts were constants. A loss built on these sums has the global
    value on every rank, and its gradient here is this rank's share of the global gradient:
    summing the ranks' gradients (all_reduce_gradients) gives the one-process gradient."""
    if world() == 1:
        return tensors
    flat = torch.cat([t.detach().double().reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    out, offset = [], 0
    for t in tensors:
        total = flat[offset : offset + t.numel()].view(t.shape).to(t.dtype)
        offset += t.numel()
        # (t - t.detach()) is 0 in value, so the value is exactly the global sum
        out.append(total + (t - t.detach()) if t.requires_grad else total)
    return tuple(out)


def mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """Cross-entropy averaged over the labelled pixels of the whole batch, on all ranks."""
    if world() == 1:
        return F.cross_entropy(logits, targets, ignore_index=ignore_index)
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    total, count = global_sums(total, (targets != ignore_index).sum())
    return total / count


def gather_shares(values: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """The 1-D `values` of every rank concatenated in rank order (rank r holds sizes[r] of
    them, known on the host); gradient flows through this rank's own values only. A loss
    that maps the whole vector element by element and averages it then has the one-process
    value and this rank's share of its gradient."""
    if world() == 1:
        return values
    longest = max(max(sizes), 1)
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[: len(values)] = values.detach()
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    parts = [part[:size] for part, size in zip(parts, sizes, strict=True)]
    parts[rank()] = values
    return torch.cat(parts)


def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the parameters' gradients over the ranks, in place (one flat all-reduce); a
    missing gradient counts as zeros. Every rank then holds the same summed gradient."""
    if world() == 1:
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        summed = flat[offset : offset + g.numel()].view(g.shape)
        offset += g.numel()
        if p.grad is None:
            p.grad = summed.clone()
        else:
            p.grad.copy_(summed)


def from_main(compute: Callable[[], T]) -> T:
    """`compute()` on rank 0, its (picklable) result broadcast to every rank; the others do
    not compute it, and raise RuntimeError naming rank 0's exception when it fails. In one
    process, just compute()."""
    if world() == 1:
        return compute()
    # A failure on rank 0 is broadcast too: the other ranks raise at once instead of waiting
    # for a result until the collective times out.
    box, error = [None], None
    if is_main():
        try:
            box = [(compute(), None)]
        except Exception as caught:
            box, error = [(None, f"{type(caught).__name__}: {caught}")], caught
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    value, failure = box[0]
    if failure is not None:
        raise RuntimeError(f"rank 0 failed, so this rank stops too: {failure}")
    return value


# -- batch norm pooled over ranks --------------------------------------------------------------
class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward sums the incoming gradients over the ranks: used
    where each rank's downstream gradient is its share (the pooled batch-norm statistics)."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _pooled_forward(norm: torch.nn.modules.batchnorm._BatchNorm, x: torch.Tensor):
    """Batch norm of this rank's x with the mean and (biased) variance of the whole batch
    over all ranks, two passes (mean, then squared deviations) for accuracy; the running
    statistics are updated as torch does, with the unbiased variance."""
    if not norm.training:
        return type(norm).forward(norm, x)
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x.float()
    # made on the device (a fill, not a copy from the host): the step never waits for the GPU
    local = xf.new_full((1,), x.numel() / max(x.shape[1], 1))
    pooled = _SumOverRanks.apply(torch.cat([xf.sum(dims), local]))
    count = pooled[-1].detach()
    mean = pooled[:-1] / count
    centred = xf - mean.view(shape)
    var = _SumOverRanks.apply((centred * centred).sum(dims)) / count
    y = centred * torch.rsqrt(var + norm.eps).view(shape)
    if norm.affine:
        y = y * norm.weight.view(shape) + norm.bias.view(shape)
    if norm.track_running_stats:
        with torch.no_grad():
            norm.num_batches_tracked.add_(1)
            if norm.momentum is None:  # the plain average over the batches seen, on the device
                factor = 1.0 / norm.num_batches_tracked.to(mean.dtype)
            else:
                factor = norm.momentum
            unbiased = var * (count / (count - 1).clamp(min=1))
            for running, batch in ((norm.running_mean, mean), (norm.running_var, unbiased)):
                running.mul_(1 - factor).add_(batch.detach().to(running.dtype) * factor)
    return y.to(x.dtype)


@contextmanager
def pooled_batch_norms(net: torch.nn.Module):
    """Within the block, `net`'s batch norms in train mode normalise with statistics pooled
    over all ranks, so the forward pass of a sharded batch equals the one-process forward of
    the whole batch. Batch norms in eval mode are per sample and left alone. No-op in one
    process."""
    if world() == 1:
        yield
        return
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.forward = types.MethodType(_pooled_forward, m)
    try:
        yield
    finally:
        for m in norms:
            del m.forward
