"""Stacked layers: many independent MLPs computed as one batched matmul per layer.

Dimension legend used in this package:

- ``M`` models in a population (1 for a single model)
- ``G`` groups of a stacked layer (``M`` for routers, ``sum_m E_m`` for experts)
- ``B`` batch, ``H`` hidden width, ``d`` data width, ``k`` latent width, ``E`` experts
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["StackedLinear", "StackedMLP", "DropoutMasks"]


class StackedLinear(nn.Module):
    """``G`` independent linear maps: ``y[g] = x[g] @ weight[g] + bias[g]``.

    Weight is stored ``(G, in, out)`` so the forward pass is one ``baddbmm``.
    """

    def __init__(self, groups: int, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(groups, 1, out_features))

    def reset_group_(self, g: int, generator: torch.Generator, out: int | None = None) -> None:
        """Initialise group ``g`` as ``nn.Linear`` does: U(-1/sqrt(in), 1/sqrt(in)) for both.

        ``out`` < out_features initialises only the first ``out`` outputs (the rest are padding
        of a model with fewer experts than the population's widest) and zeroes the others.
        """
        out = self.out_features if out is None else out
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            w = torch.empty(out, self.in_features).uniform_(-bound, bound, generator=generator)
            b = torch.empty(out).uniform_(-bound, bound, generator=generator)
            self.weight[g].zero_()
            self.bias[g].zero_()
            self.weight[g, :, :out].copy_(w.T)
            self.bias[g, 0, :out].copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)  # (G, B, in) @ (G, in, out) -> (G, B, out)


class DropoutMasks:
    """Dropout whose masks come from one random stream per model.

    A model's masks therefore do not depend on which other models share the population, so a
    population trains each model exactly as it would train alone with the same seed. Each step
    draws one buffer per model (:meth:`start`) that the dropout sites then consume in order.
    Masks are 15-bit integers, four per random int64, ~3x cheaper than ``rand``; the drop
    probability is quantised to 1/32768.
    """

    def __init__(self, p: float, generators: Sequence[torch.Generator]):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p
        self.generators = list(generators)
        self.threshold = round(p * 32768)
        self.scale = 1.0 / (1.0 - self.threshold / 32768)
        self._bufs: list[torch.Tensor] = []
        self._offsets: list[int] = []

    def start(self, sizes: Sequence[int], device) -> None:
        """Draw this step's random values: ``sizes[m]`` for model m."""
        self._bufs, self._offsets = [], [0] * len(sizes)
        for n, gen in zip(sizes, self.generators):
            bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
            bits.random_(generator=gen)
            self._bufs.append(bits.view(torch.int16)[:n] & 0x7FFF)  # uniform on [0, 32768)

    def _take(self, m: int, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        off = self._offsets[m]
        if off + n > len(self._bufs[m]):
            raise RuntimeError("dropout buffer exhausted: start() was given too small a size")
        self._offsets[m] = off + n
        return self._bufs[m][off:off + n].view(shape)

    def __call__(self, x: torch.Tensor, counts: Sequence[int],
                 widths: Sequence[int] | None = None) -> torch.Tensor:
        """Dropout on x (G, B, W) whose groups belong to the models by ``counts``.

        ``widths[m]`` < W: model m has only that many real columns (padding is always kept).
        """
        if self.threshold == 0:
            return x
        _, B, W = x.shape
        pieces = []
        for m, c in enumerate(counts):
            if widths is None or widths[m] == W:
                pieces.append(self._take(m, (c, B, W)))
            else:
                r = self._take(m, (c, B, widths[m]))
                pieces.append(torch.nn.functional.pad(r, (0, W - widths[m]), value=32767))
        r = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # (G, B, W)
        # one multiply forward and one backward (masked_fill cost a copy each way)
        mask = torch.where(r >= self.threshold, self.scale, 0.0).to(x.dtype)
        return x * mask

# ReLU networks are piecewise linear, so a curved chart is fitted by line segments with an
# error floor set by the number of pieces; smooth activations fit smooth manifolds far closer.
HIDDEN = {"relu": torch.relu, "silu": torch.nn.functional.silu, "tanh": torch.tanh,
          "softplus": torch.nn.functional.softplus}


class StackedMLP(nn.Module):
    """``G`` MLPs ``in -> width x depth (ReLU) -> out (activation)``, stacked."""

    def __init__(self, groups: int, in_features: int, width: int, depth: int,
                 out_features: int, activation: str = "linear", output_dropout: bool = False,
                 hidden_activation: str = "relu"):
        super().__init__()
        sizes = [in_features] + [width] * depth + [out_features]
        self.layers = nn.ModuleList(
            StackedLinear(groups, a, b) for a, b in zip(sizes[:-1], sizes[1:])
        )
        if activation not in ("linear", "tanh"):
            raise ValueError(f"unknown activation {activation!r}")
        if hidden_activation not in HIDDEN:
            raise ValueError(f"unknown hidden activation {hidden_activation!r}; valid: "
                             f"{', '.join(HIDDEN)}")
        self.activation = activation
        self.hidden = HIDDEN[hidden_activation]
        self.output_dropout = output_dropout

    def reset_group_(self, g: int, generator: torch.Generator, out: int | None = None) -> None:
        for layer in self.layers[:-1]:
            layer.reset_group_(g, generator)
        self.layers[-1].reset_group_(g, generator, out)

    def forward(self, x: torch.Tensor, dropout: Callable | None = None) -> torch.Tensor:
        """x: (G, B, in) -> (G, B, out); ``dropout(h)`` is applied after each hidden layer."""
        *hidden, last = self.layers
        for layer in hidden:
            x = self.hidden(layer(x))  # (G, B, width)
            if dropout is not None:
                x = dropout(x)
        x = last(x)
        if self.activation == "tanh":
            x = torch.tanh(x)
        if dropout is not None and self.output_dropout:
            x = dropout(x)
        return x
