"""One model trained by several processes (``torchrun ... -m moeae train``).

Every rank holds the same data and draws the same working set and batch order from the same
seeded streams; each rank then takes its own contiguous part of every batch. Gradients are
averaged by :class:`torch.nn.parallel.DistributedDataParallel`; every mean over the batch in
the loss is a sum reduced across ranks (with its gradient, ``torch.distributed.nn``) divided by
the global batch size, so the loss, and after DDP's averaging the gradient, are those of one
process on the whole batch. (With ``R`` ranks, the reduction's backward sums ``R`` equal
upstream gradients and DDP divides by ``R``.) Per-epoch passes over the working set
(relabelling) are split across ranks and summed back, and the starting atlas and neighbour
lists are broadcast from rank 0, so every rank trains towards identical targets.

Dropout and input noise draw from each rank's own streams, so only deterministic recipes (the
default ``best`` recipe has neither) equal one process exactly.
"""

from __future__ import annotations

import torch

from .distributed import Context

__all__ = ["DataParallel"]


class DataParallel:
    """The rank's share of a population's training.

    Parameters
    ----------
    ctx : Context, with ``world_size`` > 1 (a joined process group)
    model : torch.nn.Module, on this rank's device
    """

    def __init__(self, ctx: Context, model: torch.nn.Module):
        from torch.nn.parallel import DistributedDataParallel

        self.ctx = ctx
        cuda = ctx.device.startswith("cuda")
        # buffers (input scaling, active experts) are set identically on every rank
        self.module = DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if cuda else None, forward_sync_buffers=False)
        self.global_batch = 1

    def part(self, n: int) -> slice:
        """This rank's contiguous part of ``n`` items (parts differ by at most one item)."""
        r, R = self.ctx.rank, self.ctx.world_size
        return slice(n * r // R, n * (r + 1) // R)

    def batch(self, rows: slice, n: int) -> slice:
        """This rank's part of a global batch, the positions ``rows`` of ``n``; remembers the
        global batch's size."""
        lo, hi = rows.start, min(rows.stop, n)
        self.global_batch = hi - lo
        mine = self.part(hi - lo)
        return slice(lo + mine.start, lo + mine.stop)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, differentiably."""
        return _SumOverRanks.apply(t)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks in place (no gradient)."""
        return self.ctx.all_reduce_(t, "sum")


class _SumOverRanks(torch.autograd.Function):
    """y = sum over ranks of x; the gradient of a sum is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        torch.distributed.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        g = grad.clone()
        torch.distributed.all_reduce(g)
        return g
