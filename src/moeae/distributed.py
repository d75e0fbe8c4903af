"""Several processes through PyTorch's own launcher: ``torchrun`` detection, the process group,
and which process writes.

The same commands run in one process or under ``torchrun``, which sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` for each process it starts. :func:`init` joins the process
group (gloo on CPUs, NCCL on GPUs, one GPU per local rank) with a timeout, so a rank that dies
ends the others' collectives with an error instead of a hang; rank 0 alone writes files.

    torchrun --standalone --nproc_per_node=2 -m moeae train --data X.npy --experts 4 --out run
    torchrun --standalone --nproc_per_node=2 -m moeae sweep --data figure8 --experts 2 4 ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

__all__ = ["Context", "launched", "init", "shutdown", "SINGLE", "DistributedError",
           "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 300.0  # a collective waits this long for a silent peer (MOEAE_DIST_TIMEOUT)


class DistributedError(RuntimeError):
    """A peer process failed or fell silent: the job cannot go on."""


@dataclass(frozen=True)
class Context:
    rank: int = 0  # this process's place among all processes
    world_size: int = 1  # number of processes
    local_rank: int = 0  # place among the processes of this machine (its GPU, on CUDA)
    device: str = "cpu"  # where this process trains: cpu or cuda:LOCAL_RANK

    @property
    def is_main(self) -> bool:
        """The process that logs and writes files (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            _checked(torch.distributed.barrier)

    def all_gather_object(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order (a list of one in a single process)."""
        if not self.active:
            return [obj]
        out: list = [None] * self.world_size
        _checked(torch.distributed.all_gather_object, out, obj)
        return out

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``tensor`` as rank ``src`` has it, on every rank (in place)."""
        if self.active:
            _checked(torch.distributed.broadcast, tensor, src)
        return tensor

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.active:
            ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
            _checked(torch.distributed.all_reduce, tensor, ops[op])
        return tensor


SINGLE = Context()


def launched() -> bool:
    """True in a process started by ``torchrun`` (or any launcher that sets its variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str = "auto", timeout_s: float | None = None) -> Context:
    """Join the process group when launched by torchrun, else the single-process context.

    ``device``: ``auto`` -> NCCL and one GPU per local rank when CUDA is available, else gloo on
    the CPU; ``cpu`` -> gloo; ``cuda`` -> NCCL (an error without a GPU)."""
    if not launched():
        return SINGLE
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if world == 1:
        return Context(0, 1, 0, _device(device, local))
    dev = _device(device, local)
    if timeout_s is None:
        timeout_s = float(os.environ.get("MOEAE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if dev.startswith("cuda"):
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Context(rank, world, local, dev)


def _device(device: str, local_rank: int) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} has no GPU of its own (this machine has "
                             f"{torch.cuda.device_count()}); start at most that many processes "
                             "per machine")
        return f"cuda:{local_rank}"
    return "cpu"


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _checked(fn, *args):
    """A collective whose failure (a peer died, or the timeout passed) is one clear error."""
    try:
        return fn(*args)
    except (RuntimeError, ValueError) as exc:  # gloo/NCCL raise RuntimeError subclasses
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DistributedError(f"rank {torch.distributed.get_rank()}: a peer process failed "
                               f"or timed out ({first})") from exc
