"""The Mixture-of-Experts autoencoder: a router and E expert autoencoders, stacked.

One :class:`MoEAE` holds a *population* of ``M`` independent models (``M = 1`` for a single
model). Model ``m`` has ``E_m`` experts; all experts of all models are the ``G = sum_m E_m``
groups of one stacked encoder and one stacked decoder, and all routers are the ``M`` groups of
one stacked router whose outputs are padded to ``E = max_m E_m`` and masked.

Dimension legend: ``M`` models, ``G`` experts of all models, ``B`` batch, ``d`` data width,
``k`` latent width, ``E`` widest expert count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .config import ModelConfig
from .layers import DropoutMasks, DropoutSites, StackedMLP

__all__ = ["MoEAE", "MoEOutput", "FALLBACK_MARGIN"]

#: How many times better another expert must reconstruct a point for it to take the point
#: from the router's chart (:meth:`MoEAE.charts`).
FALLBACK_MARGIN = 10.0


class MoEOutput(NamedTuple):
    x_hat: torch.Tensor | None  # (M, B, d) soft reconstruction: sum_e p_e decoder_e(encoder_e(x))
    #                              (None from ``forward(..., mix=False)``)
    expert_outputs: torch.Tensor  # (G, B, d) each expert's reconstruction
    latents: torch.Tensor  # (G, B, k) each expert's chart coordinates
    logits: torch.Tensor  # (M, B, E) router logits, -inf where model m has no expert e
    probs: torch.Tensor  # (M, B, E) router probabilities (softmax of logits)


class MoEAE(nn.Module):
    """A population of MoE autoencoders sharing one architecture (``cfg``).

    Parameters
    ----------
    cfg : ModelConfig
        Architecture; ``cfg.n_experts`` is used when ``experts_per_model`` is not given.
    experts_per_model : sequence of int, optional
        ``E_m`` for each model of the population; default ``[cfg.n_experts]``.
    """

    # Buffers, declared for type checkers (registered in __init__; nn.Module's attribute
    # lookup would otherwise type each as "Tensor | Module").
    expert_model: torch.Tensor  # (G,) the model each expert belongs to
    expert_slot: torch.Tensor  # (G,) the expert's index within its model
    expert_valid: torch.Tensor  # (M, E) model m has an expert e
    shift: torch.Tensor  # (M, 1, d) input centre
    scale: torch.Tensor  # (M, 1, 1) input scale
    active: torch.Tensor  # (M, E) experts the router may pick
    fallback: torch.Tensor  # (M,) error above which the router's chart is checked (0: never)
    trained_agreement: torch.Tensor  # (M,) residual agreement before the output solve (NaN: none)
    arc_code: torch.Tensor  # (M, E, T) arc-length charts (moeae.arclength): codes ...
    arc_length: torch.Tensor  # (M, E, T) ... and arc lengths; absent: off

    def __init__(self, cfg: ModelConfig, experts_per_model: Sequence[int] | None = None):
        super().__init__()
        counts = list(experts_per_model or [cfg.n_experts])
        if not counts or min(counts) < 1:
            raise ValueError(f"every model needs >= 1 expert, got {counts}")
        self.cfg = cfg
        self.counts = counts
        M, G, E = len(counts), sum(counts), max(counts)
        d, k, H, L = cfg.n_features, cfg.latent_dim, cfg.width, cfg.depth
        act = cfg.activation
        chart_act = cfg.chart_activation or act  # the experts' own, if set
        if chart_act == "auto":  # ReLU charts fitted curves best, SiLU surfaces
            chart_act = "relu" if k == 1 else "silu"
        self.router = StackedMLP(M, d, H, L, E, "linear", hidden_activation=act)
        self.encoder = StackedMLP(G, d, H, L, k, "tanh", hidden_activation=chart_act)
        self.decoder = StackedMLP(G, k, H, L, d, "linear", hidden_activation=chart_act)
        model_of = torch.repeat_interleave(torch.arange(M), torch.tensor(counts))
        slot_of = torch.cat([torch.arange(c) for c in counts])
        self.register_buffer("expert_model", model_of, persistent=False)  # (G,)
        self.register_buffer("expert_slot", slot_of, persistent=False)  # (G,)
        valid = torch.arange(E)[None, :] < torch.tensor(counts)[:, None]
        self.register_buffer("expert_valid", valid, persistent=False)  # (M, E)
        # Input scaling learned at fit time: u = (x - shift) / scale; the networks see u.
        self.register_buffer("shift", torch.zeros(M, 1, d))
        self.register_buffer("scale", torch.ones(M, 1, 1))
        self.register_buffer("active", valid.clone())  # (M, E) experts the router may pick
        # Squared reconstruction distance (data units) above which the router's chart is
        # checked against the others (0: never); set after training (MoEAE.set_fallback).
        self.register_buffer("fallback", torch.zeros(M))
        # How much the residuals of neighbours along a chart agreed with the output layers as
        # trained, before they were solved (moeae.readout; NaN: not solved in this process):
        # what moeae.tears reads for underfitting right after training, since a solve leaves
        # residuals it cannot explain. Not saved: a diagnostic of the fit, not of the model.
        self.register_buffer("trained_agreement", torch.full((M,), float("nan")),
                             persistent=False)
        # curves: arc_code, arc_length, registered by MoEAE.set_arc_length after training

    @property
    def arc(self) -> bool:
        """Whether the charts are arc-length charts (:mod:`moeae.arclength`)."""
        return "arc_code" in self._buffers

    def _set_tables(self, code: torch.Tensor | None, length: torch.Tensor | None) -> None:
        for name, t in (("arc_code", code), ("arc_length", length)):
            if t is None:
                self._buffers.pop(name, None)
            else:
                self.register_buffer(name, t)

    @property
    def n_models(self) -> int:
        return len(self.counts)

    def reset_parameters(self, seeds: Sequence[int]) -> None:
        """Initialise model ``m`` from ``seeds[m]`` alone, in a fixed order (router, then each
        expert's encoder and decoder), so it starts as it would if trained on its own."""
        if len(seeds) != self.n_models:
            raise ValueError(f"need {self.n_models} seeds, got {len(seeds)}")
        g0 = 0
        for m, (count, seed) in enumerate(zip(self.counts, seeds)):
            gen = torch.Generator().manual_seed(int(seed))
            self.router.reset_group_(m, gen, out=count)
            for g in range(g0, g0 + count):
                self.encoder.reset_group_(g, gen)
                self.decoder.reset_group_(g, gen)
            g0 += count

    @torch.no_grad()
    def place_units(self, coords: torch.Tensor, seeds: Sequence[int]) -> None:
        """Curves: each decoder's first-layer units moved so that their kinks lie among its
        chart's starting codes; coords (M, n, E, 1), NaN where a point has none.

        A ReLU unit ``relu(w z + b)`` of a one-coordinate decoder bends at ``z = -b / w``. As
        initialised (``w``, ``b`` uniform in [-1, 1]) those bends spread far beyond the codes a
        chart uses (about [-0.8, 0.8], :func:`moeae.atlas.initial_atlas`), and the units bending
        outside are straight over the chart. Here unit j of H bends at the ``(j + 1/2) / H``
        quantile of the chart's codes, the quantiles dealt to the units in an order drawn from
        the model's seed; ``w`` is kept. A chart with fewer than 8 coded points keeps its
        units. Measured (docs/recipes.md, session 14), 20 seeds each, hard FVU median and worst:
        circle 1.2e-6 -> 7.4e-7 and 5.0e-6 -> 1.2e-6, figure-8 8.5e-6 -> 5.2e-6 and 3.2e-5 ->
        3.7e-5, spiral 2.1e-5 -> 1.0e-5 and 8.5e-5 -> 6.8e-5. Surfaces (SiLU units, two
        coordinates, hyperplanes through random codes) gained nothing measurable on the sphere
        (4 charts, seeds 0-3), so only curves are placed; arc-length charts do without it
        (:func:`moeae.config.isometric_overrides`). With ``TrainConfig.hold_units`` the
        trainer then leaves this layer as placed (:attr:`moeae.training.Trainer.holds_units`)."""
        if self.cfg.latent_dim != 1:
            return
        first = self.decoder.linears()[0]
        H = first.out_features
        C = coords.detach().double().cpu().numpy()
        for g in range(len(self.expert_model)):
            m, e = int(self.expert_model[g]), int(self.expert_slot[g])
            c = C[m, :, e, 0]
            c = c[~np.isnan(c)]
            if len(c) < 8:
                continue
            order = np.random.default_rng([int(seeds[m]), e]).permutation(H)
            q = np.quantile(c, (np.arange(H) + 0.5) / H)[order]
            w = first.weight[g, 0]  # (H,)
            first.bias[g, 0].copy_(-w * torch.as_tensor(q, dtype=w.dtype, device=w.device))

    def forward(self, x: torch.Tensor, dropout: DropoutMasks | None = None,
                mix: bool = True) -> MoEOutput:
        """x: (M, B, d) in data units -> :class:`MoEOutput` (reconstructions in data units).

        ``dropout`` (training only) draws each model's masks from that model's own stream.
        ``mix=False`` leaves out the soft reconstruction ``x_hat`` (what the responsibility
        objective does not use).
        """
        u = (x - self.shift) / self.scale  # (M, B, d)
        masks: Sequence[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * 3
        if dropout is not None:
            masks = dropout.draw(self.dropout_sites(), x.shape[1], x.device, x.dtype)
        logits = self.router(u, masks[0])  # (M, B, E)
        logits = logits.masked_fill(~self.active[:, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # (M, B, E)
        ug = u[self.expert_model]  # (G, B, d): each expert sees its model's batch
        z = self.encoder(ug, masks[1])  # (G, B, k)
        vg = self.decoder(z, masks[2])  # (G, B, d)
        y = vg * self.scale[self.expert_model] + self.shift[self.expert_model]  # (G, B, d)
        if not mix:
            return MoEOutput(None, y, z, logits, probs)
        p = probs[self.expert_model, :, self.expert_slot]  # (G, B)
        x_hat = torch.zeros_like(x).index_add_(0, self.expert_model, p[..., None] * y)  # (M,B,d)
        return MoEOutput(x_hat, y, z, logits, probs)

    def dropout_sites(self) -> list[DropoutSites]:
        """Dropout sites of the router, the encoders and the decoders, in that order: after
        every hidden layer and, with ``cfg.output_dropout`` (the seed's quirk), on the router
        logits (model m's ``E_m`` real columns), the latents and the reconstructions."""
        c, M = self.cfg, self.n_models
        out = c.output_dropout
        E, k, d = max(self.counts), c.latent_dim, c.n_features
        return [DropoutSites([1] * M, c.depth, c.width, self.counts if out else None, E),
                DropoutSites(self.counts, c.depth, c.width, [k] * M if out else None, k),
                DropoutSites(self.counts, c.depth, c.width, [d] * M if out else None, d)]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "fallback"
        if key not in state_dict:  # saved before the fallback existed: the router alone
            state_dict[key] = torch.zeros_like(self.fallback)
        if prefix + "arc_code" in state_dict:  # arc-length tables, of any length
            self._set_tables(*(torch.zeros_like(state_dict[prefix + n]).to(self.shift)
                               for n in ("arc_code", "arc_length")))
        else:  # plain charts
            self._set_tables(None, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    @torch.no_grad()
    def select(self, m: int) -> MoEAE:
        """Model ``m`` of the population as a population of one (weights copied)."""
        one = MoEAE(self.cfg, [self.counts[m]]).to(self.shift.device)
        g0 = sum(self.counts[:m])
        groups = slice(g0, g0 + self.counts[m])
        E = self.counts[m]
        for dst, src in zip(one.router.linears(), self.router.linears()):
            dst.weight.copy_(src.weight[m:m + 1, :, :dst.out_features])
            dst.bias.copy_(src.bias[m:m + 1, :, :dst.out_features])
        for mine, theirs in ((one.encoder, self.encoder), (one.decoder, self.decoder)):
            for dst, src in zip(mine.linears(), theirs.linears()):
                dst.weight.copy_(src.weight[groups])
                dst.bias.copy_(src.bias[groups])
        one.shift.copy_(self.shift[m:m + 1])
        one.scale.copy_(self.scale[m:m + 1])
        one.active.copy_(self.active[m:m + 1, :E])
        one.fallback.copy_(self.fallback[m:m + 1])
        one.trained_agreement.copy_(self.trained_agreement[m:m + 1])
        if self.arc:
            one._set_tables(self.arc_code[m:m + 1, :E].clone(),
                            self.arc_length[m:m + 1, :E].clone())
        return one.train(self.training)

    def padded(self, grouped: torch.Tensor) -> torch.Tensor:
        """(G, B, ...) -> (M, E, B, ...), zeros where a model has fewer experts (outside
        autograd, a view when every model has ``E``; inside, always a copy: gradients through
        a view reach the expert in another memory layout, which rounds their sums differently)."""
        M, E = self.expert_valid.shape
        if M * E == grouped.shape[0] and not grouped.requires_grad:
            return grouped.reshape((M, E) + tuple(grouped.shape[1:]))
        out = grouped.new_zeros((M, E) + tuple(grouped.shape[1:]))
        out[self.expert_model, self.expert_slot] = grouped
        return out

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's reconstruction of x (M, B, d) in data units, (G, B, d), without the
        router (what relabelling needs)."""
        u = (x - self.shift) / self.scale  # (M, B, d)
        vg = self.decoder(self.encoder(u[self.expert_model]))  # (G, B, d)
        return vg * self.scale[self.expert_model] + self.shift[self.expert_model]

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> torch.Tensor:
        """The router's chart for each point of x (M, B, d): (M, B) long."""
        logits = self.router((x - self.shift) / self.scale)  # (M, B, E)
        return logits.masked_fill(~self.active[:, None, :], float("-inf")).argmax(-1)

    @torch.no_grad()
    def charts(self, out: MoEOutput, x: torch.Tensor) -> torch.Tensor:
        """Each point's chart (M, B) from a forward pass ``out`` on x (M, B, d): the router's,
        unless that chart's expert reconstructs the point worse than ``fallback`` (squared
        distance; 0: never) and another active expert does at least
        :data:`FALLBACK_MARGIN` times better; then that expert's.

        The router cannot tell two branches of a curve apart where they cross, and may send
        a few points there to a chart that does not hold them (figure-8, seed 12: squared
        error 0.95 at 0.02 from the crossing); every expert has already decoded the point,
        so the one that reconstructs it takes it."""
        chart = out.probs.argmax(-1)  # (M, B)
        if not bool((self.fallback > 0).any()):
            return chart
        err = ((self.padded(out.expert_outputs) - x[:, None]) ** 2).sum(-1)  # (M, E, B)
        err = err.masked_fill(~self.active[:, :, None], float("inf"))
        own = err.gather(1, chart[:, None]).squeeze(1)  # (M, B)
        best, which = err.min(1)  # (M, B)
        limit = self.fallback[:, None]
        switch = (limit > 0) & (own > limit) & (best * FALLBACK_MARGIN < own)
        return torch.where(switch, which, chart)

    @torch.no_grad()
    def set_fallback(self, x: torch.Tensor, gate: float, chunk: int = 1024) -> None:
        """``fallback`` := ``gate`` x the 99th percentile, per model, of the squared distance
        at which the router's chart reconstructs the points x (M, n, d) (its training data);
        ``gate`` <= 0: the router alone decides (``fallback`` 0)."""
        self.fallback.zero_()
        if gate <= 0:
            return
        was = self.training
        self.eval()
        own = []
        for i in range(0, x.shape[1], chunk):
            xb = x[:, i:i + chunk]
            out = self.forward(xb, mix=False)
            _, y = self.hard(out)  # the router's chart
            own.append(((y - xb) ** 2).sum(-1))
        self.train(was)
        q = torch.quantile(torch.cat(own, 1).double(), 0.99, dim=1)
        self.fallback.copy_(gate * q)

    def finish_charts(self, x: torch.Tensor, gate: float, arc_length: bool,
                      refit_outputs: bool = False) -> None:
        """After training, from the training points x (M, n, d): the router's ``fallback``
        (:meth:`set_fallback`, ``gate``), with ``refit_outputs`` the decoders' output layers
        solved on their charts' points (:func:`moeae.readout.refit_outputs`, then the fallback
        again) and, for a curve with ``arc_length``, arc-length charts (:meth:`set_arc_length`)."""
        self.set_fallback(x, gate)
        if refit_outputs:
            from .readout import refit_outputs as refit

            refit(self, x)
            self.set_fallback(x, gate)
        if arc_length and self.cfg.latent_dim == 1:
            self.set_arc_length(x)

    @torch.no_grad()
    def set_arc_length(self, x: torch.Tensor, chunk: int = 1024) -> None:
        """Make the charts arc-length charts (:func:`moeae.arclength.tables`) from the points
        x (M, n, d) (the training data), each in its chart (:meth:`charts`)."""
        from .arclength import tables

        was = self.training
        self.eval()
        chart = torch.cat([self.charts(self.forward(x[:, i:i + chunk], mix=False),
                                       x[:, i:i + chunk]) for i in range(0, x.shape[1], chunk)], 1)
        self._set_tables(*tables(self, x, chart))
        self.train(was)

    @torch.no_grad()
    def codes(self, out: MoEOutput, x: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From a forward pass ``out`` on x (M, B, d): each point's chart (M, B), its hard
        reconstruction (M, B, d) and every chart's code (M, E, B, k). Arc-length charts: by
        projection (:func:`moeae.arclength.project`); else :meth:`hard` and the encoders."""
        if self.arc:
            from .arclength import project

            chart, y, s, _ = project(self, x, prefer=out.probs.argmax(-1))
            return chart, y, self.padded(s)
        chart, y = self.hard(out, x)
        return chart, y, self.padded(out.latents)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Atlas codes: x (M, B, d) -> chart (M, B) long (:meth:`codes`), z (M, B, k) of
        that chart."""
        chart, _, z = self.codes(self.forward(x, mix=False), x)  # z (M, E, B, k)
        z = z.gather(1, chart[:, None, :, None].expand(-1, 1, -1, z.shape[-1]))[:, 0]
        return chart, z

    @torch.no_grad()
    def decode(self, chart: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Hard decoding: chart (M, B) long, z (M, B, k) -> x (M, B, d) from that chart only."""
        zg = z[self.expert_model]  # (G, B, k): every decoder decodes every point ...
        if self.arc:  # arc length -> the network's code, each chart by its own table, and
            from .arclength import extended, raw_codes  # straight beyond its ends

            vg = extended(self, raw_codes(self, zg))  # (G, B, d)
        else:
            vg = self.decoder(zg)
        y = self.padded(vg * self.scale[self.expert_model] + self.shift[self.expert_model])
        idx = chart[:, None, :, None].expand(-1, 1, -1, y.shape[-1])  # ... and the chart picks
        return y.gather(1, idx)[:, 0]  # (M, B, d)

    @torch.no_grad()
    def hard(self, out: MoEOutput, x: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """From a forward pass on x (M, B, d): chart (M, B) (:meth:`charts`; without x, the
        router's) and hard reconstruction (M, B, d)."""
        chart = out.probs.argmax(-1) if x is None else self.charts(out, x)  # (M, B)
        y = self.padded(out.expert_outputs)  # (M, E, B, d)
        idx = chart[:, None, :, None].expand(-1, 1, -1, y.shape[-1])
        return chart, y.gather(1, idx)[:, 0]
