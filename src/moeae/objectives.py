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

Every mean over the batch goes through :meth:`Objective.batch_mean`, which under data
parallelism (:mod:`moeae.data_parallel`) is the mean over every rank's part of the batch.
The training loop (:mod:`moeae.training`) knows an objective, a model and data; a new term
belongs here, not in the loop.
"""

from __future__ import annotations

import torch

from .config import TrainConfig
from .data_parallel import DataParallel
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
                 coords: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Per-model loss (M,) of the forward pass ``out`` of model ``m`` on a batch x
        (M, B, d), and its terms for the log.

        ``labels`` (M, B, E): routing targets where ``warm`` (the warm start, or relabelled
        epochs); ``progress`` in [0, 1] anneals the temperature; ``coords`` (M, B, E, k), NaN
        where unknown: target chart coordinates (warm start).
        """
        valid = m.active
        bmean = self.batch_mean
        if self.cfg.routing == "soft":
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
                if warm:
                    weight = target  # the given labels
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
        if self.cfg.balance_weight:
            bal = LossTerms.load_balance(out.probs, valid, bmean)
            terms["balance"] = bal
            loss = loss + self.cfg.balance_weight * bal
        return loss, terms

    def batch_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over the batch (dim 1) of (M, B, ...): under data parallelism, over every
        rank's part of it (a sum reduced across ranks, gradients included)."""
        if self.parallel is None:
            return t.mean(1)
        return self.parallel.sum(t.sum(1)) / self.parallel.global_batch

    def batch_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the batch (dim 1), across ranks under data parallelism."""
        return t.sum(1) if self.parallel is None else self.parallel.sum(t.sum(1))
