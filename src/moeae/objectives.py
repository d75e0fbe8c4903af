"""What a training step minimises: the routing objectives and their loss terms.

Two routing modes (``TrainConfig.routing``):

- ``"soft"`` (the seed): loss = MSE(x, sum_e p_e x_hat_e) + w * MSE(batch-mean logits, 0).
- ``"responsibility"``: each expert e has error ``err_e`` on each point; the router is trained
  by cross-entropy towards detached targets built from ``softmax(-err / tau)`` (as the
  chart-assignment step of Chart Auto-Encoders, Schonsheck et al. 2019), with ``tau`` annealed
  from soft to nearly hard; each expert learns its error weighted by the same targets (or the
  router's probabilities). During the warm start and relabelled epochs the targets are given
  (``labels``), and with ``latent_init`` each chart's coordinates are pulled towards given
  ones.

Constraint terms on the charts (:mod:`moeae.geometry`), for either mode: ``isometry`` (each
decoder keeps lengths up to one scale per chart) and ``fold_guard`` (each decoder's stretch
stays within a band around that scale), on every expert at its own latents, each point weighted
by its membership of the expert's chart.

Every mean over the batch goes through :meth:`Objective.batch_mean`, which under data
parallelism (:mod:`moeae.data_parallel`) is the mean over every rank's part of the batch.
The training loop (:mod:`moeae.training`) knows an objective, a model and data; a new term
belongs here, not in the loop.
"""

from __future__ import annotations

import torch

from .config import TrainConfig
from .data_parallel import DataParallel
from .geometry import isometry_terms, stacked_jvp
from .model import MoEAE, MoEOutput

__all__ = ["Objective", "LossTerms"]


def _batch_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean(1)  # (M, B, ...) -> (M, ...)


class LossTerms:
    """Per-model loss terms, each of shape (M,). ``mean`` averages over the batch (dim 1); under
    data parallelism it is the mean over every rank's part of the batch."""

    @staticmethod
    def reconstruction(x_hat, x, scale):
        return (((x_hat - x) / scale) ** 2).mean(dim=(1, 2))  # MSE in normalised units

    @staticmethod
    def router_mean_logits(logits, valid, mean=_batch_mean):
        # The seed's "router loss": MSE(mean over the batch of the logits, 0), valid experts only.
        m = mean(torch.where(valid[:, None, :], logits, 0.0))  # (M, E)
        return (m**2).sum(-1) / valid.sum(-1)

    @staticmethod
    def load_balance(probs, valid, mean=_batch_mean):
        # Switch Transformer (Fedus et al. 2021, eq. 4): E * sum_e f_e P_e, minimal when uniform.
        E = valid.sum(-1).to(probs.dtype)  # (M,)
        top = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)
        return E * (mean(top) * mean(probs)).sum(-1)


class Objective:
    """The per-model loss of a population's batch, as ``TrainConfig`` sets it.

    Parameters
    ----------
    cfg : TrainConfig
    parallel : DataParallel, optional
        Under torchrun: batch means are taken over every rank's part of the batch.
    """

    def __init__(self, cfg: TrainConfig, parallel: DataParallel | None = None):
        self.cfg, self.parallel = cfg, parallel

    def tau(self, progress: float) -> float:
        """Responsibility temperature, annealed geometrically from tau_start to tau_end."""
        c = self.cfg
        return c.tau_start * (c.tau_end / c.tau_start) ** min(1.0, progress)

    # -- one step ---------------------------------------------------------------------------
    def __call__(self, m: MoEAE, out: MoEOutput, x: torch.Tensor,
                 labels: torch.Tensor | None, progress: float, warm: bool,
                 coords: torch.Tensor | None = None,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Per-model loss (M,) of the forward pass ``out`` of model ``m`` on a batch x
        (M, B, d), and its terms for the log.

        ``labels`` (M, B, E): routing targets where ``warm`` (the warm start, or relabelled
        epochs); ``progress`` in [0, 1] anneals the temperature; ``coords`` (M, B, E, k), NaN
        where unknown: target chart coordinates (warm start). ``weights`` (M, B, E): how much
        each expert learns each point, where it differs from ``labels`` (``expert_overlap``).
        """
        valid = m.active
        bmean = self.batch_mean
        if self.cfg.routing == "soft":
            if out.x_hat is None:
                raise ValueError("the soft objective needs the soft mix (forward with mix=True)")
            if self.parallel is None:
                rec = LossTerms.reconstruction(out.x_hat, x, m.scale)
            else:
                rec = bmean(((out.x_hat - x) / m.scale) ** 2).mean(-1)  # normalised MSE (M,)
            terms = {"reconstruction": rec}
            loss = rec
            if self.cfg.router_loss_weight:
                rl = LossTerms.router_mean_logits(out.logits, valid, bmean)
                terms["router"] = rl
                loss = loss + self.cfg.router_loss_weight * rl
        else:
            err = (((m.padded(out.expert_outputs) - x[:, None]) / m.scale[:, None]) ** 2).mean(-1)
            err = err.transpose(1, 2)  # (M, E, B) -> (M, B, E)
            with torch.no_grad():
                if warm:
                    if labels is None:
                        raise ValueError("a warm step needs routing targets (labels)")
                    target = labels
                else:
                    e = err.masked_fill(~valid[:, None, :], float("inf"))
                    ref = torch.where(valid[:, None, :], e, 0.0).sum(-1) / valid.sum(-1)[:, None]
                    t = self.tau(progress) * bmean(ref)[:, None, None].clamp_min(1e-12)
                    target = torch.softmax(-e / t, dim=-1)  # (M, B, E)
                chart_weight = target  # the constraint terms: where each chart is used
                if warm:
                    weight = target if weights is None else weights  # the given labels
                elif self.cfg.expert_weight == "target":
                    weight = target
                else:
                    weight = out.probs.detach()
            logp = torch.log_softmax(out.logits, -1).masked_fill(~valid[:, None, :], 0.0)
            router = bmean(-(target * logp).sum(-1))  # cross-entropy (M,)
            expert = bmean((weight * err.masked_fill(~valid[:, None, :], 0.0)).sum(-1))
            terms = {"expert": expert, "router": router}
            loss = expert + router
            if coords is not None:
                z = m.padded(out.latents).transpose(1, 2)  # (M, B, E, k)
                known = ~coords.isnan()
                sq = torch.where(known, z - coords.nan_to_num(0.0), 0.0) ** 2
                if self.parallel is None:
                    lat = sq.sum((1, 2, 3)) / known.sum((1, 2, 3)).clamp_min(1)
                else:
                    lat = self.batch_sum(sq.sum((2, 3))) / self.batch_sum(
                        known.sum((2, 3)).to(sq.dtype)).clamp_min(1)
                terms["coordinates"] = lat
                loss = loss + self.cfg.latent_init * lat
        if self.cfg.isometry or self.cfg.fold_guard or self.cfg.chart_inverse:
            if self.cfg.routing == "soft":
                chart_weight = out.probs.detach()
            elif weights is None:
                chart_weight = weight
            # not on an expert's margin (expert_overlap), only where its chart is used
            iso, guard, inv = self.chart_terms(m, out, chart_weight)
            terms["isometry"], terms["fold_guard"], terms["inverse"] = iso, guard, inv
            loss = loss + self.cfg.isometry * iso + self.cfg.fold_guard * guard
            if self.cfg.chart_inverse:
                loss = loss + self.cfg.chart_inverse * inv
        if self.cfg.balance_weight:
            bal = LossTerms.load_balance(out.probs, valid, bmean)
            terms["balance"] = bal
            loss = loss + self.cfg.balance_weight * bal
        return loss, terms

    def chart_terms(self, m: MoEAE, out: MoEOutput,
                    weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Isometry, folding-guard and (with ``cfg.chart_inverse``) inverse terms per model
        (M,) of the decoders at the batch's latents, each point weighted by ``weight``
        (M, B, E), its membership of each chart.

        The latents are detached: the terms shape each decoder's parametrisation of its chart;
        the encoders follow through the reconstruction. Each point gets one direction, fixed
        per batch position (no random stream, so a model trains the same in any population).
        """
        z = out.latents.detach()  # (G, B, k)
        G, B, k = z.shape
        w = weight[m.expert_model, :, m.expert_slot]  # (G, B) membership of own chart
        w = w * m.active[m.expert_model, m.expert_slot][:, None]
        b = min(B, self.cfg.isometry_points)
        if b < B:  # each expert at the batch's points most its own: the rest weigh ~0
            w, idx = w.topk(b, dim=1, sorted=False)  # (G, b)
            z = z.gather(1, idx[..., None].expand(-1, -1, k))  # (G, b, k)
        v = self.directions(b, k, z)[None].expand(G, -1, -1)  # (G, b, k)
        y, jv = stacked_jvp(m.decoder, z, v)  # (G, b, d) points and tangents, standardised
        r = (jv**2).sum(-1)  # (G, b) squared stretch along v
        iso, guard, mass, _ = isometry_terms(r, w, self.cfg.fold_band, self.batch_sum)
        # the encoder inverts the decoder along the chart: E'(D(z)) D'(z) v = v, so the codes
        # of data points move at the decoder's (constant) speed, not only the decoded points
        # (off unless cfg.chart_inverse: it made the figure-8 fail, see docs/recipes.md)
        if self.cfg.chart_inverse:
            _, ejv = stacked_jvp(m.encoder, y.detach(), jv.detach())  # (G, b, k)
            inv = self.batch_sum(w * ((ejv - v) ** 2).sum(-1)) / mass.clamp_min(1e-12)  # (G,)
        else:
            inv = torch.zeros_like(iso)
        M = m.n_models
        total = mass.new_zeros(M).index_add(0, m.expert_model, mass).clamp_min(1e-12)
        iso, guard, inv = [mass.new_zeros(M).index_add(0, m.expert_model, mass * t) / total
                           for t in (iso, guard, inv)]  # each expert weighted by its points
        return iso, guard, inv

    _dirs: dict = {}

    @classmethod
    def directions(cls, B: int, k: int, like: torch.Tensor) -> torch.Tensor:
        """Unit directions (B, k), one per batch position: for k = 1 the only one; else drawn
        once from a fixed seed, so over a batch they cover every direction, as ``J^T J = s^2 I``
        asks (stretch 1 along the axes alone would allow shear)."""
        key = (B, k, like.dtype, like.device)
        if key not in cls._dirs:
            if k == 1:
                v = torch.ones(B, 1)
            else:
                v = torch.randn(B, k, generator=torch.Generator().manual_seed(0))
                v = v / v.norm(dim=-1, keepdim=True)
            cls._dirs[key] = v.to(like.device, like.dtype)
        return cls._dirs[key]

    def batch_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over the batch (dim 1) of (M, B, ...): under data parallelism, over every
        rank's part of it (a sum reduced across ranks, gradients included)."""
        if self.parallel is None:
            return t.mean(1)
        return self.parallel.sum(t.sum(1)) / self.parallel.global_batch

    def batch_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the batch (dim 1), across ranks under data parallelism."""
        return t.sum(1) if self.parallel is None else self.parallel.sum(t.sum(1))
