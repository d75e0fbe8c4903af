"""The training loop: it knows a population model, a loss and data, nothing about plots or files.

One :class:`Trainer` trains ``M`` independent models at once: inputs are ``(M, n, d)``, each
model has its own seed, its own shuffling and dropout streams, and the total loss is the sum of
the per-model losses, so each model's gradients and Adam updates are exactly those it would get
alone. Evaluation, snapshots and checkpoints attach as callbacks (``on_epoch_end``).

Two routing modes (``TrainConfig.routing``):

- ``"soft"`` (the seed): loss = MSE(x, sum_e p_e x_hat_e) + w * MSE(batch-mean logits, 0).
- ``"responsibility"``: each expert e has error ``err_e`` on each point; the router is trained
  by cross-entropy towards detached targets built from ``softmax(-err / tau)`` (as the
  chart-assignment step of Chart Auto-Encoders, Schonsheck et al. 2019), with ``tau`` annealed
  from soft to nearly hard; each expert learns its error weighted by the same targets (or the
  router's probabilities). Charts can start from a geodesic atlas of the data
  (``chart_init``, :mod:`moeae.atlas`, followed by ``warm_start_epochs`` towards those charts
  and, with ``latent_init``, towards each chart's unrolled coordinates); with
  ``relabel_neighbors`` the targets are recomputed once per epoch over the whole training set
  and averaged over each point's nearest neighbours (:meth:`Trainer.relabel`), else per batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .atlas import initial_atlas
from .config import TrainConfig
from .layers import DropoutMasks
from .model import MoEAE
from .optim import FusedAdam

__all__ = ["Trainer", "evaluate", "DivergenceError", "LossTerms", "resolve_device"]


# Points per forward pass when evaluating: activations of all experts of a population stay
# cache-sized; 128 took 0.17-0.19 s for the 12-model seed study on 1000 points, one chunk 0.31 s.
EVAL_CHUNK = 128


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss."""

    def __init__(self, epoch: int, step: int, models: list[int]):
        self.epoch, self.step, self.models = epoch, step, models
        super().__init__(f"training diverged: non-finite loss at epoch {epoch}, step {step} "
                         f"(model(s) {models}); lower the learning rate or set grad_clip")

    def __reduce__(self):  # pickled by its fields: it crosses from worker processes
        return type(self), (self.epoch, self.step, self.models)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU")
    return torch.device(device)


class LossTerms:
    """Per-model loss terms, each of shape (M,)."""

    @staticmethod
    def reconstruction(x_hat, x, scale):
        return (((x_hat - x) / scale) ** 2).mean(dim=(1, 2))  # MSE in normalised units

    @staticmethod
    def router_mean_logits(logits, valid):
        # The seed's "router loss": MSE(mean over the batch of the logits, 0), valid experts only.
        mean = torch.where(valid[:, None, :], logits, 0.0).mean(dim=1)  # (M, E)
        return (mean**2).sum(-1) / valid.sum(-1)

    @staticmethod
    def load_balance(probs, valid):
        # Switch Transformer (Fedus et al. 2021, eq. 4): E * sum_e f_e P_e, minimal when uniform.
        E = valid.sum(-1).to(probs.dtype)  # (M,)
        top = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)
        return E * (top.mean(1) * probs.mean(1)).sum(-1)


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    history: list = field(default_factory=list)  # per epoch: mean training loss per model


class Trainer:
    """Train a :class:`MoEAE` population.

    Parameters
    ----------
    model : MoEAE
    cfg : TrainConfig
    seeds : sequence of int, one per model
    device : torch.device
    """

    def __init__(self, model: MoEAE, cfg: TrainConfig, seeds: Sequence[int], device=None):
        if len(seeds) != model.n_models:
            raise ValueError(f"need {model.n_models} seeds, got {len(seeds)}")
        self.cfg = cfg
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device or "cpu")
        self.model = model.to(self.device)
        self.state = TrainState()
        # One stream per model for shuffling (CPU) and one for dropout (on the device).
        self.shuffle_gens = [torch.Generator().manual_seed(s + 7919) for s in self.seeds]
        self.dropout_gens = [torch.Generator(device=self.device).manual_seed(s + 104729)
                             for s in self.seeds]
        mc = model.cfg
        self.dropout = DropoutMasks(mc.dropout, self.dropout_gens) if mc.dropout > 0 else None
        self.labels: torch.Tensor | None = None  # (M, n, E) routing targets per point
        self.knn: torch.Tensor | None = None  # (M, n, k) neighbours of each training point
        self.coords: torch.Tensor | None = None  # (M, n, E, k) starting chart coordinates
        self.optimizer = FusedAdam(self.model.parameters(), lr=cfg.lr,
                                   weight_decay=cfg.weight_decay)

    # -- set-up ---------------------------------------------------------------------------
    def initialize(self, X: torch.Tensor) -> None:
        """Fresh start: weights from the seeds, input scaling and initial charts from X (M,n,d)."""
        self.model.reset_parameters(self.seeds)
        with torch.no_grad():
            if self.cfg.standardize:
                shift = X.mean(dim=1, keepdim=True)  # (M, 1, d)
                # one overall scale keeps the geometry: RMS distance to the mean
                scale = ((X - shift) ** 2).sum(-1).mean(1).sqrt()[:, None, None]  # (M, 1, 1)
                self.model.shift.copy_(shift)
                self.model.scale.copy_(scale.clamp_min(1e-12))
        if self.cfg.chart_init:
            k = self.model.cfg.latent_dim
            E = max(self.model.counts)
            shared: dict = {}  # models on the same data share its graph and embedding
            starts = [initial_atlas(X[m].cpu().numpy(), c, k, s, overlap=self.cfg.init_overlap,
                                    coordinates=self.cfg.latent_init > 0, cache=shared)
                      for m, (c, s) in enumerate(zip(self.model.counts, self.seeds))]
            labels = [np.pad(lab, ((0, 0), (0, E - lab.shape[1]))) for lab, _ in starts]
            self.labels = torch.as_tensor(np.stack(labels), dtype=torch.float32,
                                          device=self.device)
            if self.cfg.latent_init > 0:
                coords = [np.pad(c, ((0, 0), (0, E - c.shape[1]), (0, 0)),
                                 constant_values=np.nan) for _, c in starts]
                self.coords = torch.as_tensor(np.stack(coords), dtype=torch.float32,
                                              device=self.device)
        if self.cfg.routing == "responsibility" and self.cfg.relabel_neighbors > 0:
            from sklearn.neighbors import NearestNeighbors

            # plain k-NN: neighbours along the manifold only (no smoothing across a crossing)
            # made the figure-8 fail more often (5 of 10 starts against 3 of 10)
            k = min(self.cfg.relabel_neighbors, X.shape[1])
            knn = [NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)[1]
                   for x in X.cpu().numpy()]
            self.knn = torch.as_tensor(np.stack(knn), device=self.device)  # (M, n, k)

    @torch.no_grad()
    def relabel(self, X: torch.Tensor, progress: float) -> None:
        """Routing targets for the next epoch, from the whole training set: each point's
        responsibilities ``softmax(-err / tau)``, averaged over its nearest neighbours in the
        data. The average keeps charts contiguous where two experts fit equally well, which
        per-batch targets turned into many one-point fragments."""
        m = self.model
        was = m.training
        m.eval()
        valid = m.active[:, None, :]  # (M, 1, E)
        errs = []
        for i in range(0, X.shape[1], EVAL_CHUNK):
            xb = X[:, i:i + EVAL_CHUNK]
            y = m.padded(m(xb).expert_outputs)  # (M, E, b, d)
            errs.append((((y - xb[:, None]) / m.scale[:, None]) ** 2).mean(-1).transpose(1, 2))
        m.train(was)
        err = torch.cat(errs, 1).masked_fill(~valid, float("inf"))  # (M, n, E)
        ref = torch.where(valid, err, 0.0).sum((1, 2)) / (valid.sum((1, 2)) * err.shape[1])
        tau = self.tau(progress) * ref.clamp_min(1e-12)[:, None, None]  # (M, 1, 1)
        r = torch.softmax(-err / tau, dim=-1)  # (M, n, E)
        M, n, k = self.knn.shape
        E = r.shape[-1]
        idx = self.knn.reshape(M, n * k, 1).expand(-1, -1, E)
        r = r.gather(1, idx).view(M, n, k, E).mean(2)  # (M, n, E)
        if self.cfg.relabel_hard:  # winner takes the point: overlaps shrink, ties resolve
            r = torch.nn.functional.one_hot(r.argmax(-1), E).to(r.dtype)
        self.labels = r

    def lr_factor(self, step: int, total: int, steps_per_epoch: int) -> float:
        warm = self.cfg.warmup_epochs * steps_per_epoch
        if step < warm:
            return (step + 1) / warm
        if self.cfg.schedule == "cosine":
            progress = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def tau(self, progress: float) -> float:
        c = self.cfg
        return c.tau_start * (c.tau_end / c.tau_start) ** min(1.0, progress)

    # -- one step ---------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, labels: torch.Tensor | None, progress: float,
             warm: bool, coords: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Per-model loss (M,) for a batch x (M, B, d) and its terms for the log.

        ``coords`` (M, B, E, k), NaN where unknown: target chart coordinates (warm start).
        """
        m = self.model
        out = m(x, self.dropout if m.training else None)
        valid = m.active
        if self.cfg.routing == "soft":
            rec = LossTerms.reconstruction(out.x_hat, x, m.scale)
            terms = {"reconstruction": rec}
            loss = rec
            if self.cfg.router_loss_weight:
                rl = LossTerms.router_mean_logits(out.logits, valid)
                terms["router"] = rl
                loss = loss + self.cfg.router_loss_weight * rl
        else:
            err = (((m.padded(out.expert_outputs) - x[:, None]) / m.scale[:, None]) ** 2).mean(-1)
            err = err.transpose(1, 2)  # (M, E, B) -> (M, B, E)
            with torch.no_grad():
                if warm:
                    target = labels
                else:
                    e = err.masked_fill(~valid[:, None, :], float("inf"))
                    ref = torch.where(valid[:, None, :], e, 0.0).sum(-1) / valid.sum(-1)[:, None]
                    t = self.tau(progress) * ref.mean(-1)[:, None, None].clamp_min(1e-12)
                    target = torch.softmax(-e / t, dim=-1)  # (M, B, E)
                if warm:
                    weight = labels
                elif self.cfg.expert_weight == "target":
                    weight = target
                else:
                    weight = out.probs.detach()
            logp = torch.log_softmax(out.logits, -1).masked_fill(~valid[:, None, :], 0.0)
            router = -(target * logp).sum(-1).mean(-1)  # cross-entropy (M,)
            expert = (weight * err.masked_fill(~valid[:, None, :], 0.0)).sum(-1).mean(-1)
            terms = {"expert": expert, "router": router}
            loss = expert + router
            if coords is not None:
                z = m.padded(out.latents).transpose(1, 2)  # (M, B, E, k)
                known = ~coords.isnan()
                sq = torch.where(known, z - coords.nan_to_num(0.0), 0.0) ** 2
                lat = sq.sum((1, 2, 3)) / known.sum((1, 2, 3)).clamp_min(1)
                terms["coordinates"] = lat
                loss = loss + self.cfg.latent_init * lat
        if self.cfg.balance_weight:
            bal = LossTerms.load_balance(out.probs, valid)
            terms["balance"] = bal
            loss = loss + self.cfg.balance_weight * bal
        return loss, terms

    def _clip_(self) -> None:
        """Clip each model's global gradient norm separately (models stay independent)."""
        m = self.model
        # Router weights have one group per model; encoder/decoder weights one per expert.
        owned = [(m.router.parameters(), None),
                 (list(m.encoder.parameters()) + list(m.decoder.parameters()), m.expert_model)]
        owned = [(p, owner) for params, owner in owned for p in params if p.grad is not None]
        sq = torch.zeros(m.n_models, device=self.device)
        for p, owner in owned:
            per_group = p.grad.pow(2).flatten(1).sum(1)  # (groups,)
            sq = sq + per_group if owner is None else sq.index_add(0, owner, per_group)
        factor = (self.cfg.grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # (M,)
        for p, owner in owned:
            f = factor if owner is None else factor[owner]
            p.grad.mul_(f.view(-1, *([1] * (p.grad.dim() - 1))))

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, X: torch.Tensor, epochs: int,
            on_epoch_end: Callable[[Trainer], None] | None = None,
            progress: bool = False) -> TrainState:
        """Train on X (M, n, d) until ``epochs`` epochs are complete (resumes from state)."""
        cfg, m, st = self.cfg, self.model, self.state
        X = X.to(self.device)
        M, n, d = X.shape
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        total = epochs * steps_per_epoch
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=epochs, initial=st.epoch, unit="epoch", desc="training")
        for epoch in range(st.epoch, epochs):
            m.train()
            perm = torch.stack([torch.randperm(n, generator=g) for g in self.shuffle_gens])
            perm = perm.to(self.device)  # (M, n)
            running = torch.zeros(M, device=self.device)
            warm = self.labels is not None and epoch < cfg.warm_start_epochs
            if self.knn is not None and epoch >= cfg.warm_start_epochs:
                self.relabel(X, epoch / max(1, epochs))
                warm = True  # train towards the smoothed targets
            for s in range(steps_per_epoch):
                idx = perm[:, s * cfg.batch_size:(s + 1) * cfg.batch_size]  # (M, b)
                xb = X.gather(1, idx[..., None].expand(-1, -1, d))  # (M, b, d)
                if cfg.input_noise > 0:  # each model's noise from its own stream
                    noise = torch.cat([torch.randn((1,) + xb.shape[1:], generator=g,
                                                   device=self.device)
                                       for g in self.dropout_gens])
                    xb = xb + cfg.input_noise * m.scale * noise
                lb = None if self.labels is None else self.labels.gather(
                    1, idx[..., None].expand(-1, -1, self.labels.shape[-1]))  # (M, b, E)
                cb = None
                if self.coords is not None and epoch < cfg.warm_start_epochs:
                    E, k = self.coords.shape[2:]
                    cb = self.coords.gather(1, idx[..., None, None].expand(-1, -1, E, k))
                self.optimizer.lr = cfg.lr * self.lr_factor(st.step, total, steps_per_epoch)
                loss, _ = self.loss(xb, lb, st.step / max(1, total), warm, cb)
                if not torch.isfinite(loss).all():
                    bad = torch.nonzero(~torch.isfinite(loss)).flatten().tolist()
                    raise DivergenceError(epoch + 1, s + 1, bad)
                self.optimizer.zero_grad()
                loss.sum().backward()  # models are independent: d(sum)/d(theta_m) = dL_m/d(theta_m)
                if cfg.grad_clip:
                    self._clip_()
                self.optimizer.step()
                running += loss.detach()
                st.step += 1
            st.epoch = epoch + 1
            st.history.append((running / steps_per_epoch).tolist())
            if bar is not None:
                bar.set_postfix(loss=f"{float(np.mean(st.history[-1])):.3g}")
                bar.update(1)
            if on_epoch_end is not None:
                on_epoch_end(self)
        if bar is not None:
            bar.close()
        return st

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue bit-identically: model, optimizer, RNG streams."""
        rng = {}
        for i, (a, b) in enumerate(zip(self.shuffle_gens, self.dropout_gens)):
            rng[f"shuffle.{i}"] = a.get_state()
            rng[f"dropout.{i}"] = b.get_state()
        extra = {} if self.labels is None else {"labels": self.labels}
        if self.knn is not None:
            extra["knn"] = self.knn
        if self.coords is not None:
            extra["coords"] = self.coords
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": rng, "extra": extra,
                "state": {"epoch": self.state.epoch, "step": self.state.step,
                          "history": self.state.history, "seeds": self.seeds}}

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd["model"])
        if sd.get("optimizer") is not None:
            self.optimizer.load_state_dict(sd["optimizer"])
        for i, (a, b) in enumerate(zip(self.shuffle_gens, self.dropout_gens)):
            a.set_state(sd["rng"][f"shuffle.{i}"])
            b.set_state(sd["rng"][f"dropout.{i}"])
        labels = sd.get("extra", {}).get("labels")
        self.labels = None if labels is None else labels.to(self.device)
        knn = sd.get("extra", {}).get("knn")
        self.knn = None if knn is None else knn.to(self.device)
        coords = sd.get("extra", {}).get("coords")
        self.coords = None if coords is None else coords.to(self.device)
        st = sd["state"]
        self.state = TrainState(st["epoch"], st["step"], list(st["history"]))

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, X: torch.Tensor, chunk: int = EVAL_CHUNK) -> dict[str, np.ndarray]:
        return evaluate(self.model, X, chunk)


@torch.no_grad()
def evaluate(model: MoEAE, X: torch.Tensor, chunk: int = EVAL_CHUNK) -> dict[str, np.ndarray]:
    """Eval-mode outputs of a population on X (M, n, d), as numpy: a snapshot per model.

    Keys: inputs (M, n, d), x_soft (M, n, d), x_hard (M, n, d), chart (M, n), probs (M, n, E),
    expert_outputs (M, E, n, d), latents (M, E, n, k).
    """
    was = model.training
    model.eval()
    device = model.shift.device
    parts = []
    for i in range(0, X.shape[1], chunk):
        xb = X[:, i:i + chunk].to(device)
        out = model(xb)
        chart, x_hard = model.hard(out)
        parts.append({
            "x_soft": out.x_hat, "x_hard": x_hard, "chart": chart,
            "probs": out.probs.nan_to_num(0.0),
            "expert_outputs": model.padded(out.expert_outputs),  # (M, E, b, d)
            "latents": model.padded(out.latents),  # (M, E, b, k)
        })
    model.train(was)
    res = {}
    for key in parts[0]:
        axis = 2 if key in ("expert_outputs", "latents") else 1
        res[key] = torch.cat([p[key] for p in parts], dim=axis).cpu().numpy()
    res["inputs"] = X.cpu().numpy()
    return res
