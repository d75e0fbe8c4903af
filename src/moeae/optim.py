"""Adam through PyTorch's own fused kernel, without ``torch.optim.Adam``'s start-up cost.

``torch.optim.Optimizer.__init__`` imports ``torch._dynamo`` on first use (measured here:
1.3-1.8 s per process, as long as the whole seed study's training on a GPU-less laptop takes
to get going). The functional ``torch.optim.adam.adam`` / ``adamw.adamw`` run the same fused
kernel without that import, so this class only keeps the state and calls them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch.optim.adam import adam as _adam
from torch.optim.adamw import adamw as _adamw

__all__ = ["FusedAdam", "flush_denormals"]


class FusedAdam:
    """Adam (AdamW when ``weight_decay`` > 0) with ``torch.optim.Adam``'s state-dict layout.

    Set ``lr`` between steps to schedule the learning rate.

    The parameters are moved into one flat buffer (each stays the same ``Parameter``, now a
    view of it), so a step is one fused kernel over one tensor: with a separate tensor per
    layer, the kernel's per-tensor work (its step counters, read back one by one) cost as
    much as the update itself for the small networks here. The arithmetic is elementwise and
    identical up to rounding (``flat=False``: a tensor per parameter, as before; parameters on
    several devices or of several dtypes always keep their own tensors).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, flat: bool = True):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.flat: torch.Tensor | None = None
        if flat and self.params and len({(p.device, p.dtype) for p in self.params}) == 1:
            self.flat = _flatten_(self.params)
            self.flat_avg, self.flat_avg_sq = (torch.zeros_like(self.flat),
                                               torch.zeros_like(self.flat))
            self.exp_avg = _views(self.flat_avg, self.params)
            self.exp_avg_sq = _views(self.flat_avg_sq, self.params)
            # one step counter: every tensor steps together
            self.steps = [torch.zeros((), dtype=torch.float32, device=self.flat.device)]
        else:
            self.exp_avg = [torch.zeros_like(p) for p in self.params]
            self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
            # the fused kernels keep the step count as a float32 tensor beside each parameter
            self.steps = [torch.zeros((), dtype=torch.float32, device=p.device)
                          for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        if self.flat is not None:
            # a tensor without a gradient counts as a zero gradient, as a part of one stacked
            # tensor that the loss does not reach (a switched-off expert's) always does
            grads = torch.cat([p.grad.reshape(-1) if p.grad is not None else
                               torch.zeros_like(p).reshape(-1) for p in self.params])
            self._update([self.flat], [grads], [self.flat_avg], [self.flat_avg_sq], self.steps)
            return
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        self._update([self.params[i] for i in idx], [self.params[i].grad for i in idx],
                     [self.exp_avg[i] for i in idx], [self.exp_avg_sq[i] for i in idx],
                     [self.steps[i] for i in idx])

    def _update(self, params, grads, avg, avg_sq, steps) -> None:
        fn = _adamw if self.weight_decay > 0 else _adam
        fn(params, grads, avg, avg_sq, [], steps, foreach=False, fused=True, capturable=False,
           differentiable=False, grad_scale=None, found_inf=None, has_complex=False,
           amsgrad=False, beta1=self.betas[0], beta2=self.betas[1], lr=self.lr,
           weight_decay=self.weight_decay, eps=self.eps, maximize=False)

    def _step_of(self, i: int) -> torch.Tensor:
        return self.steps[0 if self.flat is not None else i]

    def state_dict(self) -> dict:
        state = {i: {"step": self._step_of(i), "exp_avg": m, "exp_avg_sq": v}
                 for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq))}
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
                self._step_of(i).copy_(torch.as_tensor(st["step"]))
        group = sd["param_groups"][0]
        self.lr, self.betas = group["lr"], tuple(group["betas"])
        self.eps, self.weight_decay = group["eps"], group["weight_decay"]


def _flatten_(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Copy ``params`` into one new flat buffer and make each a view of it (in place: the
    modules keep their ``Parameter`` objects). Returns the buffer."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    for p, view in zip(params, _views(flat, params)):
        p.data = view
    return flat


def _views(flat: torch.Tensor, like: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """``flat`` cut into tensors shaped as ``like``, in order."""
    return [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in like]), like)]


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
