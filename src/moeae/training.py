"""The training loop: it knows a population model, a loss and data, nothing about plots or files.

One :class:`Trainer` trains ``M`` independent models at once: inputs are ``(M, n, d)``, each
model has its own seed, its own shuffling and dropout streams, and the total loss is the sum of
the per-model losses, so each model's gradients and Adam updates are exactly those it would get
alone. Evaluation, snapshots and checkpoints attach as callbacks (``on_epoch_end``).

What a step minimises is the :class:`~moeae.objectives.Objective` (routing modes and loss
terms). Charts can start from a geodesic atlas of the data (``chart_init``, :mod:`moeae.atlas`,
followed by ``warm_start_epochs`` towards those charts and, with ``latent_init``, towards each
chart's unrolled coordinates); with ``relabel_neighbors`` the routing targets are recomputed
once per epoch over the epoch's working set and averaged over each point's nearest neighbours
(:meth:`Trainer.relabel`), else per batch. Under ``torchrun`` one population trains
data-parallel (:mod:`moeae.data_parallel`).

An epoch is one pass over a working set of at most ``cfg.working_set`` points: all the data
when it is no larger, else a fresh random sample of it (:mod:`moeae.working_set`), so the
budget, ``epochs x ceil(working_set / batch_size)`` steps, does not grow with the data. Steps
never wait for the host: a non-finite loss is recorded on the device and raised as
:class:`DivergenceError` (naming its epoch and step) when the epoch ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .atlas import align_coordinates, clean_points, initial_atlas
from .checkpoint import member_state
from .config import TrainConfig
from .data_parallel import DataParallel
from .distributed import SINGLE, Context, DistributedError
from .layers import DropoutMasks
from .model import MoEAE
from .neighbors import kneighbors
from .objectives import LossTerms, Objective
from .optim import FusedAdam, clip_per_model_, flush_denormals
from .targets import routing_targets
from .working_set import TrainingData, draw_indices

__all__ = ["Trainer", "evaluate", "member_state", "DivergenceError", "LossTerms", "resolve_device"]


# Points per forward pass when evaluating: activations of all experts of a population stay
# cache-sized; 128 took 0.17-0.19 s for the 12-model seed study on 1000 points, one chunk 0.31 s.
EVAL_CHUNK = 128


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss."""

    def __init__(self, epoch: int, step: int, models: list):
        # models: their places in the population (int), or their names (a sweep's folders)
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
    ctx : moeae.distributed.Context, optional
        Under ``torchrun``: the ranks that train this population data-parallel.
    """

    def __init__(self, model: MoEAE, cfg: TrainConfig, seeds: Sequence[int], device=None,
                 ctx: Context | None = None):
        if len(seeds) != model.n_models:
            raise ValueError(f"need {model.n_models} seeds, got {len(seeds)}")
        self.cfg = cfg
        self.seeds = [int(s) for s in seeds]
        self.ctx = ctx or SINGLE
        self.device = torch.device(self.ctx.device if self.ctx.active else (device or "cpu"))
        self.model = model.to(self.device)
        if self.holds_units:  # before DDP, which then leaves them out
            for p in self.model.decoder.linears()[0].parameters():
                p.requires_grad_(False)
        # under torchrun: each rank takes part of every batch (moeae.data_parallel)
        self.parallel = DataParallel(self.ctx, self.model) if self.ctx.active else None
        self.forward_model = self.model if self.parallel is None else self.parallel.module
        self.objective = Objective(cfg, self.parallel)
        self.state = TrainState()
        # One stream per model for shuffling (CPU) and one for dropout (on the device).
        self.shuffle_gens = [torch.Generator().manual_seed(s + 7919) for s in self.seeds]
        self.dropout_gens = [torch.Generator(device=self.device).manual_seed(s + 104729)
                             for s in self.seeds]
        mc = model.cfg
        self.dropout = DropoutMasks(mc.dropout, self.dropout_gens) if mc.dropout > 0 else None
        self.labels: torch.Tensor | None = None  # (M, n, E) routing targets per point
        self.expert_weights: torch.Tensor | None = None  # (M, n, E) after relabelling
        self.clean: torch.Tensor | None = None  # (M, n) points away from self-crossings
        self.knn: torch.Tensor | None = None  # (M, n, k) neighbours of each training point
        self.coords: torch.Tensor | None = None  # (M, n, E, k) starting chart coordinates
        self.anchor: torch.Tensor | None = None  # (M, W) the atlas's sample of large data
        self.atlas_cache: dict = {}  # models on the same data share its graph and embedding
        self.optimizer = FusedAdam(self.model.parameters(), lr=cfg.lr,
                                   weight_decay=cfg.weight_decay)

    # -- set-up ---------------------------------------------------------------------------
    def data(self, X) -> TrainingData:
        """``X`` as :class:`TrainingData` of this population (tensors (M, n, d) per model, or
        one array (n, d), possibly memory-mapped, shared by all models)."""
        if isinstance(X, TrainingData):
            return X
        return TrainingData(X, self.model.n_models, self.device, self.model.shift.dtype)

    def working_size(self, n: int) -> int:
        """Points per epoch: all ``n`` up to ``cfg.working_set``, else that many."""
        return min(n, self.cfg.working_set)

    def initialize(self, X) -> None:
        """Fresh start: weights from the seeds, input scaling and initial charts from the data
        (a tensor (M, n, d), an array (n, d) or :class:`TrainingData`). Beyond
        ``cfg.working_set`` points, the atlas is built on a fixed sample of that many per model
        (the *anchor*), where the warm start then trains."""
        data = self.data(X)
        self.model.reset_parameters(self.seeds)
        with torch.no_grad():
            if self.cfg.standardize:
                S = data.stats_rows()
                shift = S.mean(dim=1, keepdim=True)  # (M, 1, d)
                # one overall scale keeps the geometry: RMS distance to the mean
                scale = ((S - shift) ** 2).sum(-1).mean(1).sqrt()[:, None, None]  # (M, 1, 1)
                self.model.shift.copy_(shift)
                self.model.scale.copy_(scale.clamp_min(1e-12))
        W = self.working_size(data.n)
        if W < data.n:
            self.anchor = torch.as_tensor(data.anchor(W))  # (M, W)
            Xa = data.gather(self.anchor.numpy())
        else:
            self.anchor = None
            Xa = data.full()
        if self.cfg.chart_init:
            k = self.model.cfg.latent_dim
            E = max(self.model.counts)
            starts = [initial_atlas(Xa[m].cpu().numpy(), c, k, s, overlap=self.cfg.init_overlap,
                                    coordinates=self.cfg.latent_init > 0,
                                    cache=self.atlas_cache)
                      for m, (c, s) in enumerate(zip(self.model.counts, self.seeds))]
            labels = [np.pad(lab, ((0, 0), (0, E - lab.shape[1]))) for lab, _ in starts]
            dtype = self.model.shift.dtype
            self.labels = torch.as_tensor(np.stack(labels), dtype=dtype, device=self.device)
            if self.cfg.expert_overlap > 0 and Xa.shape[1] <= 2000:  # as the atlas saw them
                clean = [clean_points(Xa[m].cpu().numpy(), k, self.atlas_cache)
                         for m in range(len(starts))]
                self.clean = torch.as_tensor(np.stack(clean), dtype=dtype, device=self.device)
            if self.cfg.latent_init > 0:
                coords = [np.pad(c, ((0, 0), (0, E - c.shape[1]), (0, 0)),
                                 constant_values=np.nan) for _, c in starts]
                stacked = np.stack(coords)  # (M, n, E, k)
                rows = np.flatnonzero(~np.isnan(stacked).all((0, 2, 3)))  # the atlas's points
                start = np.zeros(stacked.shape)
                start[:, rows] = self._latents(Xa[:, rows])
                aligned = [align_coordinates(c, z) for c, z in zip(stacked, start)]
                self.coords = torch.as_tensor(np.stack(aligned), dtype=dtype,
                                              device=self.device)
        if self.relabels and W == data.n:  # else neighbours of each epoch's working set
            self.knn = self.neighbours(Xa)
        for t in (self.labels, self.coords, self.clean):  # every rank: rank 0's atlas
            if t is not None:
                self.ctx.broadcast_(t)
        if self.cfg.place_units and self.coords is not None:
            self.model.place_units(self.coords, self.seeds)

    @torch.no_grad()
    def _latents(self, X: torch.Tensor) -> np.ndarray:
        """Every expert's coordinates of X (M, n, d) at the current weights: (M, n, E, k)."""
        m = self.model
        u = ((X.to(self.device) - m.shift) / m.scale)[m.expert_model]  # (G, n, d)
        return m.padded(m.encoder(u)).transpose(1, 2).double().cpu().numpy()

    @property
    def holds_units(self) -> bool:
        """Whether curve decoders' first layers stay as
        :meth:`moeae.model.MoEAE.place_units` places them (``cfg.hold_units``; only where the
        starting atlas gives codes to place them among)."""
        c = self.cfg
        return (c.hold_units and c.place_units and c.chart_init and c.latent_init > 0
                and self.model.cfg.latent_dim == 1)

    @property
    def relabels(self) -> bool:
        return self.cfg.routing == "responsibility" and self.cfg.relabel_neighbors > 0

    def neighbours(self, X: torch.Tensor) -> torch.Tensor:
        """Each point's ``cfg.relabel_neighbors`` nearest points (itself included) within its
        model's data X (M, n, d): (M, n, k) indices on the device."""
        # plain k-NN: neighbours along the manifold only (no smoothing across a crossing)
        # made the figure-8 fail more often (5 of 10 starts against 3 of 10)
        k = min(max(self.cfg.relabel_neighbors, self.cfg.expert_overlap), X.shape[1])
        src = X if X.device.type != "cpu" else X.numpy()
        lists = [kneighbors(x, k)[1] for x in src]
        knn = torch.as_tensor(np.stack(lists), device=self.device)  # (M, n, k)
        return self.ctx.broadcast_(knn)  # the same lists on every rank

    def relabel(self, X: torch.Tensor, progress: float) -> None:
        """This epoch's routing targets and expert weights for its working set X (M, n, d)
        (:func:`moeae.targets.routing_targets`)."""
        if self.knn is None:
            raise RuntimeError("relabel needs the neighbour lists of initialize()")
        clean = self.clean if self.clean is not None and self.clean.shape[1] == X.shape[1] \
            else None
        self.labels, self.expert_weights = routing_targets(
            self.model, X, self.knn, self.cfg, self.tau(progress), self.parallel, clean)

    def lr_factor(self, step: int, total: int, steps_per_epoch: int) -> float:
        warm = self.cfg.warmup_epochs * steps_per_epoch
        if step < warm:
            return (step + 1) / warm
        if self.cfg.schedule == "cosine":
            progress = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def tau(self, progress: float) -> float:
        return self.objective.tau(progress)

    def loss(self, x: torch.Tensor, labels: torch.Tensor | None, progress: float,
             warm: bool, coords: torch.Tensor | None = None,
             weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Per-model loss (M,) of a batch x (M, B, d) and its terms (:mod:`moeae.objectives`)."""
        out = self.forward_model(x, self.dropout if self.model.training else None,
                                 mix=self.cfg.routing == "soft")
        return self.objective(self.model, out, x, labels, progress, warm, coords, weights)

    # -- the loop ---------------------------------------------------------------------------
    def planned_steps(self, n: int, epochs: int) -> int:
        """Optimizer steps of ``epochs`` epochs on ``n`` points: bounded by the working set."""
        return epochs * math.ceil(self.working_size(n) / self.cfg.batch_size)

    def _epoch_data(self, data: TrainingData, epoch: int, progress: float):
        """This epoch's points X (M, w, d) on the device, their order (M, w), and whether the
        epoch trains towards fixed targets (``self.labels``, ``self.coords``, indexed like X)."""
        cfg = self.cfg
        W = self.working_size(data.n)
        warm = self.labels is not None and epoch < cfg.warm_start_epochs
        if W == data.n:
            X = data.full()
        elif warm and self.anchor is not None:  # the warm start trains where the atlas was
            X = data.gather(self.anchor.numpy())  # built
        else:  # a fresh working set, each model from its own stream
            X = data.gather(np.stack([draw_indices(data.n, W, g) for g in self.shuffle_gens]))
        perm = torch.stack([torch.randperm(W, generator=g) for g in self.shuffle_gens])
        if self.relabels and epoch >= cfg.warm_start_epochs:
            if W < data.n:
                self.knn = self.neighbours(X)
            self.relabel(X, progress)
            warm = True  # train towards the smoothed targets
        return X, perm.to(self.device), warm

    def fit(self, X, epochs: int,
            on_epoch_end: Callable[[Trainer], None] | None = None,
            progress: bool = False) -> TrainState:
        """Train until ``epochs`` epochs are complete (resumes from state).

        ``X``: a tensor (M, n, d), an array (n, d) shared by all models (an ``np.memmap`` is
        read a working set at a time) or :class:`TrainingData`. Each epoch is one pass over a
        working set of ``min(n, cfg.working_set)`` points (:mod:`moeae.working_set`)."""
        cfg, st = self.cfg, self.state
        data = self.data(X)
        steps_per_epoch = math.ceil(self.working_size(data.n) / cfg.batch_size)
        total = epochs * steps_per_epoch
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=epochs, initial=st.epoch, unit="epoch", desc="training")
        for epoch in range(st.epoch, epochs):
            try:
                with flush_denormals():
                    self._epoch(data, epoch, epochs, steps_per_epoch, total)
            except RuntimeError as exc:
                if self.parallel is None or isinstance(exc, (DistributedError,
                                                             DivergenceError)):
                    raise
                # a collective failed: a peer process died or fell silent
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise DistributedError(f"rank {self.ctx.rank}: a peer process failed or "
                                       f"timed out ({first[:200]})") from exc
            if bar is not None:
                bar.set_postfix(loss=f"{float(np.mean(st.history[-1])):.3g}")
                bar.update(1)
            if epoch + 1 == epochs and (cfg.fallback_gate > 0 or cfg.arc_length
                                        or cfg.refit_outputs):
                # before the last checkpoint: the router's fallback, solved output layers,
                # arc-length tables
                self.model.finish_charts(data.gather(self._rows(data)), cfg.fallback_gate,
                                         cfg.arc_length, cfg.refit_outputs)
            if on_epoch_end is not None:
                on_epoch_end(self)
        if bar is not None:
            bar.close()
        return st

    def _rows(self, data: TrainingData, limit: int = 10_000) -> np.ndarray:
        """Each model's rows of the training data that judge it: all, or a fixed sample of
        ``limit`` (M, n')."""
        n = data.n
        idx = np.arange(n) if n <= limit else np.sort(
            np.random.default_rng(self.seeds[0]).choice(n, limit, replace=False))
        return np.tile(idx, (self.model.n_models, 1))

    def _epoch(self, data: TrainingData, epoch: int, epochs: int, steps_per_epoch: int,
               total: int) -> None:
        """One pass over this epoch's working set."""
        cfg, m, st = self.cfg, self.model, self.state
        M, d, B = m.n_models, data.d, cfg.batch_size
        m.train()
        Xe, perm, warm = self._epoch_data(data, epoch, epoch / max(1, epochs))
        # the epoch's points and targets in the order of its steps, gathered once: a step
        # takes a slice
        order = perm[..., None]  # (M, w, 1)
        Xs = Xe.gather(1, order.expand(-1, -1, d))  # (M, w, d)
        Ls = None if self.labels is None or not warm else self.labels.gather(
            1, order.expand(-1, -1, self.labels.shape[-1]))  # (M, w, E)
        Ws = None
        if self.expert_weights is not None and warm and epoch >= cfg.warm_start_epochs:
            Ws = self.expert_weights.gather(1, order.expand(-1, -1,
                                                            self.expert_weights.shape[-1]))
        Cs = None
        if self.coords is not None and epoch < cfg.warm_start_epochs:
            E, k = self.coords.shape[2:]
            Cs = self.coords.gather(1, order[..., None].expand(-1, -1, E, k))  # (M, w, E, k)
        # each step's loss per model, kept on the device and read once per epoch, so steps
        # never wait for the host
        losses = torch.zeros(steps_per_epoch, M, device=self.device)
        for s in range(steps_per_epoch):
            part = slice(s * B, (s + 1) * B)
            if self.parallel is not None:
                part = self.parallel.batch(part, Xs.shape[1])  # this rank's part of the batch
            xb = Xs[:, part]  # (M, b, d)
            if cfg.input_noise > 0:  # each model's noise from its own stream
                noise = torch.cat([torch.randn((1,) + xb.shape[1:], generator=g,
                                               device=self.device)
                                   for g in self.dropout_gens])
                xb = xb + cfg.input_noise * m.scale * noise
            lb = None if Ls is None else Ls[:, part]  # (M, b, E)
            wb = None if Ws is None else Ws[:, part]
            cb = None if Cs is None else Cs[:, part]  # (M, b, E, k)
            self.optimizer.lr = cfg.lr * self.lr_factor(st.step, total, steps_per_epoch)
            loss, _ = self.loss(xb, lb, st.step / max(1, total), warm, cb, wb)
            self.optimizer.zero_grad()
            loss.sum().backward()  # models are independent: d(sum)/d(theta_m) = dL_m/d(theta_m)
            if cfg.grad_clip:
                clip_per_model_(m, float(cfg.grad_clip))
            self.optimizer.step()
            losses[s] = loss.detach()
            st.step += 1
        # the first step of this epoch whose loss was not finite, per model (0: none)
        bad = ~torch.isfinite(losses)  # (steps, M)
        first_bad = torch.where(bad.any(0), bad.to(torch.uint8).argmax(0) + 1, 0)
        if self.parallel is not None:
            self.ctx.all_reduce_(first_bad, "max")  # every rank stops together
        if bool((first_bad > 0).any()):
            bad_models = torch.nonzero(first_bad).flatten().tolist()
            raise DivergenceError(epoch + 1, int(first_bad[first_bad > 0].min()), bad_models)
        st.epoch = epoch + 1
        st.history.append((losses.sum(0) / steps_per_epoch).tolist())

    def best_member(self, data, limit: int = 10_000) -> int:
        """The model of the population whose hard reconstruction of the training data (all of
        it, or a fixed sample of ``limit`` points) has the lowest squared error: how the best
        of ``n_init`` starts is chosen."""
        data = self.data(data)
        if self.model.n_models == 1:
            return 0
        ev = evaluate(self.model, data.gather(self._rows(data, limit)))
        return int(((ev["x_hard"] - ev["inputs"]) ** 2).sum(-1).mean(-1).argmin())

    def keep_member(self, m: int) -> Trainer:
        """A trainer of model ``m`` of this population alone, continuing it exactly."""
        one = Trainer(self.model.select(m), self.cfg, [self.seeds[m]], self.device, self.ctx)
        one.load_state_dict(member_state(self, m))
        return one

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue bit-identically: model, optimizer, RNG streams."""
        rng = {}
        for i, (a, b) in enumerate(zip(self.shuffle_gens, self.dropout_gens)):
            rng[f"shuffle.{i}"] = a.get_state()
            rng[f"dropout.{i}"] = b.get_state()
        extra = {} if self.labels is None else {"labels": self.labels}
        if self.knn is not None and self.anchor is None:  # else redrawn with each working set
            extra["knn"] = self.knn
        if self.coords is not None:
            extra["coords"] = self.coords
        if self.clean is not None:
            extra["clean"] = self.clean
        if self.anchor is not None:
            extra["anchor"] = self.anchor
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
        clean = sd.get("extra", {}).get("clean")
        self.clean = None if clean is None else clean.to(self.device)
        coords = sd.get("extra", {}).get("coords")
        self.coords = None if coords is None else coords.to(self.device)
        anchor = sd.get("extra", {}).get("anchor")
        self.anchor = None if anchor is None else anchor.cpu()
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
        chart, x_hard, latents = model.codes(out, xb)  # latents (M, E, b, k)
        parts.append({"x_soft": out.x_hat, "x_hard": x_hard, "chart": chart,
                      "probs": out.probs.nan_to_num(0.0), "latents": latents,
                      "expert_outputs": model.padded(out.expert_outputs)})  # (M, E, b, d)
    model.train(was)
    res = {}
    for key in parts[0]:
        axis = 2 if key in ("expert_outputs", "latents") else 1
        res[key] = torch.cat([p[key] for p in parts], dim=axis).cpu().numpy()
    res["inputs"] = X.cpu().numpy()
    return res
