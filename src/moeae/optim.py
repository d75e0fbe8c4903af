"""Adam through PyTorch's own fused kernel, without ``torch.optim.Adam``'s start-up cost.

``torch.optim.Optimizer.__init__`` imports ``torch._dynamo`` on first use (measured here:
1.3-1.8 s per process, as long as the whole seed study's training on a GPU-less laptop takes
to get going). This class keeps the state and calls the fused kernel (``torch._fused_adam_``,
what ``torch.optim.Adam(fused=True)`` runs) directly. The step counts of all parameters are
views of one tensor, so a step advances them in one operation: PyTorch's functional wrapper
adds 1 to each count separately and groups the tensors by device first, which cost 140 us
of a 330 us step here (30 parameter tensors of a 2-chart model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, cast

import torch

if TYPE_CHECKING:
    from .model import MoEAE

__all__ = ["FusedAdam", "clip_per_model_", "flush_denormals"]


class FusedAdam:
    """Adam (AdamW when ``weight_decay`` > 0) with ``torch.optim.Adam``'s state-dict layout.

    Set ``lr`` between steps to schedule the learning rate.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        # the fused kernels keep the step count as a float32 tensor beside each parameter: here
        # views of one tensor per device, so one add advances every count
        self._on: dict[torch.device, list[int]] = {}  # each device's parameters
        for i, p in enumerate(self.params):
            self._on.setdefault(p.device, []).append(i)
        self._counts = {dev: torch.zeros(len(mine), dtype=torch.float32, device=dev)
                        for dev, mine in self._on.items()}
        self.steps: list[torch.Tensor] = [torch.empty(())] * len(self.params)
        self._slot: dict[int, int] = {}  # each parameter's place in its device's counts
        for dev, mine in self._on.items():
            for j, i in enumerate(mine):
                self.steps[i] = self._counts[dev][j]
                self._slot[i] = j
        # parameters that take no gradient (held layers): the counts of the others, by device
        self._partial: dict[tuple[torch.device, tuple[int, ...]],
                            tuple[torch.Tensor, torch.Tensor]] = {}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        every = all(p.grad is not None for p in self.params)  # the usual case
        # one kernel call per device; AdamW (decoupled weight decay) when weight_decay > 0
        fn = torch._fused_adamw_ if self.weight_decay > 0 else torch._fused_adam_
        for dev, on in self._on.items():
            if every:
                self._counts[dev].add_(1)  # every count moves in one operation
                mine = on
            else:
                mine = [i for i in on if self.params[i].grad is not None]
                if not mine:
                    continue
                key = (dev, tuple(mine))
                if key not in self._partial:
                    idx = torch.tensor([self._slot[i] for i in mine], device=dev)
                    self._partial[key] = idx, torch.ones(len(mine), device=dev)
                idx, ones = self._partial[key]
                self._counts[dev].index_add_(0, idx, ones)  # their counts in one operation too
            grads = [cast(torch.Tensor, self.params[i].grad) for i in mine]
            fn([self.params[i] for i in mine], grads,
               [self.exp_avg[i] for i in mine], [self.exp_avg_sq[i] for i in mine], [],
               [self.steps[i] for i in mine], amsgrad=False, lr=self.lr,
               beta1=self.betas[0], beta2=self.betas[1], weight_decay=self.weight_decay,
               eps=self.eps, maximize=False, grad_scale=None, found_inf=None)

    def state_dict(self) -> dict:
        state = {i: {"step": s, "exp_avg": m, "exp_avg_sq": v}
                 for i, (s, m, v) in enumerate(zip(self.steps, self.exp_avg, self.exp_avg_sq))}
        group = {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                 "weight_decay": self.weight_decay, "params": list(range(len(self.params)))}
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd["state"]) != len(self.params):
            raise ValueError(f"optimizer state has {len(sd['state'])} tensors, the model "
                             f"{len(self.params)}")
        with torch.no_grad():
            for i in range(len(self.params)):
                st = sd["state"][i]
                if st["exp_avg"].shape != self.params[i].shape:
                    raise ValueError(f"optimizer state {i} has shape {tuple(st['exp_avg'].shape)}"
                                     f", the parameter {tuple(self.params[i].shape)}")
                self.exp_avg[i].copy_(st["exp_avg"])
                self.exp_avg_sq[i].copy_(st["exp_avg_sq"])
                self.steps[i].copy_(torch.as_tensor(st["step"]))
        group = sd["param_groups"][0]
        self.lr, self.betas = group["lr"], tuple(group["betas"])
        self.eps, self.weight_decay = group["eps"], group["weight_decay"]


@torch.no_grad()
def clip_per_model_(m: MoEAE, max_norm: float) -> None:
    """Clip the global gradient norm of each model of the population ``m`` to ``max_norm``,
    each model separately (models stay independent)."""
    # Router weights have one group per model; encoder/decoder weights one per expert.
    groups = [(list(m.router.parameters()), None),
              (list(m.encoder.parameters()) + list(m.decoder.parameters()), m.expert_model)]
    owned = [(p.grad, owner) for params, owner in groups for p in params
             if p.grad is not None]
    sq = torch.zeros(m.n_models, device=m.shift.device)
    for grad, owner in owned:
        per_group = grad.pow(2).flatten(1).sum(1)  # (groups,)
        sq = sq + per_group if owner is None else sq.index_add(0, owner, per_group)
    factor = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # (M,)
    for grad, owner in owned:
        f = factor if owner is None else factor[owner]
        grad.mul_(f.view(-1, *([1] * (grad.dim() - 1))))


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """CPU arithmetic treats subnormal floats as zero inside the block, as before outside it.

    As a fit converges, Adam's second moments (squared gradients) fall below float32's normal
    range, and subnormal arithmetic is slow on x86: measured on a circle fit, the Adam step
    took 4.6 s of 14.0 s with subnormals and 1.0 s of 9.8 s without, for the same result."""
    probe = torch.tensor([1e-39]) * torch.tensor([1.0])
    was = bool(probe.item() == 0.0)  # the thread's setting before the block
    if not torch.set_flush_denormal(True):  # not supported by this CPU: nothing to restore
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(was)
