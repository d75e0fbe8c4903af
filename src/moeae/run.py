"""Run folders: one trained model on disk, resumable, and usable for encode/decode/evaluate.

A run folder holds

- ``config.json``: model and training configs and where the data came from;
- ``data.npz``: the training (and test) arrays, so a resume needs nothing else; for a
  memory-mapped ``.npy`` file, only a sample to evaluate on (config.json names the file);
- ``checkpoint.safetensors``: weights, input scaling, optimizer, RNG streams, epoch and step,
  written atomically at the start and after every epoch;
- ``snapshots/epoch_NNNN.npz``: eval-mode outputs on the test set after each epoch;
- ``metrics.json``: one row of metrics per epoch.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_npz,
    save_checkpoint,
    save_npz,
    write_json,
)
from .config import ModelConfig, TrainConfig, from_dict, to_dict, with_budget
from .data import check_trainable
from .distributed import SINGLE, Context
from .metrics import snapshot_metrics
from .model import MoEAE
from .training import Trainer, evaluate, resolve_device
from .working_set import read_rows, release_pages

__all__ = ["RunError", "train_run", "resume_run", "load_model", "encode", "decode",
           "evaluate_run", "RUN_FILES", "charts_in_use", "switch_off_unused"]

RUN_FILES = ("config.json", "data.npz", "checkpoint.safetensors", "metrics.json", "snapshots")


class RunError(ValueError):
    """A run folder that is missing, incomplete, or would be overwritten."""


def check_configs(model_cfg: ModelConfig, train_cfg: TrainConfig, n_samples: int,
                  n_features: int) -> None:
    """Reject settings that cannot train, with the offending value in the message."""
    if model_cfg.n_experts < 1:
        raise ValueError(f"n_experts must be >= 1, got {model_cfg.n_experts}")
    if model_cfg.latent_dim < 1:
        raise ValueError(f"latent_dim must be >= 1, got {model_cfg.latent_dim}")
    if model_cfg.latent_dim >= n_features:
        raise ValueError(f"latent_dim ({model_cfg.latent_dim}) must be smaller than the number "
                         f"of features (n_features = {n_features}): an autoencoder must "
                         "compress")
    if model_cfg.width < 1 or model_cfg.depth < 1:
        raise ValueError(f"width and depth must be >= 1, got {model_cfg.width}, "
                         f"{model_cfg.depth}")
    if train_cfg.epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {train_cfg.epochs}")
    if train_cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {train_cfg.batch_size}")
    if not train_cfg.lr > 0:
        raise ValueError(f"lr must be > 0, got {train_cfg.lr}")
    if isinstance(train_cfg.n_init, bool) or not isinstance(train_cfg.n_init, int) \
            or train_cfg.n_init < 1:
        raise ValueError(f"n_init must be an int >= 1, got {train_cfg.n_init!r}")
    if train_cfg.working_set < 2:
        raise ValueError(f"working_set must be >= 2, got {train_cfg.working_set}")
    if n_samples < 2:
        raise ValueError(f"need at least 2 samples to train, got {n_samples}")
    if train_cfg.routing not in ("soft", "responsibility"):
        raise ValueError(f"routing must be 'soft' or 'responsibility', got {train_cfg.routing!r}")


def as_population(X: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    """Data (n, d) as the input of a population of one model: (1, n, d)."""
    return torch.as_tensor(np.asarray(X), dtype=dtype)[None]  # (1, n, d)


def _snapshot(model: MoEAE, X: torch.Tensor, m: int = 0) -> dict[str, np.ndarray]:
    """Model ``m``'s outputs on X (1, n, d)."""
    if model.n_models > 1:
        model = model.select(m)
    return {k: v[0] for k, v in evaluate(model, X).items()}


class _Recorder:
    """on_epoch_end callback: snapshot, metrics row, then checkpoint (in that order, so a
    kill between them only costs a redo of that epoch)."""

    def __init__(self, run_dir: Path, X_eval: np.ndarray, t_eval, closed: bool,
                 config: dict, rows: list[dict]):
        self.run_dir, self.X = run_dir, as_population(X_eval)
        self.t, self.closed, self.config, self.rows = t_eval, closed, config, rows

    def checkpoint(self, trainer: Trainer) -> None:
        sd = trainer.state_dict()
        save_checkpoint(self.run_dir / "checkpoint.safetensors", model=sd["model"],
                        optimizer=sd["optimizer"], rng=sd["rng"], extra_tensors=sd["extra"],
                        meta={"state": sd["state"], "config": self.config,
                              "version": __version__})

    def __call__(self, trainer: Trainer) -> None:
        epoch = trainer.state.epoch
        # several starts (n_init): the one with the lowest training loss this epoch
        m = int(np.argmin(trainer.state.history[-1])) if trainer.state.history else 0
        snap = _snapshot(trainer.model, self.X, m)
        if self.t is not None:
            snap["t"] = self.t
        save_npz(self.run_dir / "snapshots" / f"epoch_{epoch:04d}.npz", snap)
        last = epoch == trainer.cfg.epochs
        row = {"epoch": epoch, "train_loss": float(trainer.state.history[-1][m]),
               **snapshot_metrics(snap, self.t, self.closed, neighborhood=last)}
        self.rows[:] = [r for r in self.rows if r["epoch"] < epoch] + [row]
        write_json(self.run_dir / "metrics.json", self.rows)
        self.checkpoint(trainer)


def _remove_stale_tmp(run_dir: Path) -> None:
    """Delete temporary files that a killed writer left beside our run files."""
    for name in RUN_FILES[:-1]:
        for p in run_dir.glob(f".{name}.*.tmp"):
            p.unlink(missing_ok=True)
    for p in run_dir.glob("snapshots/.epoch_*.npz.*.tmp"):
        p.unlink(missing_ok=True)


def remove_own_files(folder: Path, names) -> None:
    """Delete the files and folders ``names`` of ``folder``: only our own files, so nothing
    else a user keeps there is touched."""
    for name in names:
        p = folder / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _prepare_dir(run_dir: Path, force: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir} exists and is not a folder")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise RunError(f"run folder {run_dir} is not empty; use --force to overwrite it or "
                           "--resume to continue it")
        remove_own_files(run_dir, RUN_FILES)
        _remove_stale_tmp(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


EVAL_MAX = 2000  # snapshots and metrics of larger training data use a fixed sample this big
CODE_CHUNK = 8192  # points per forward pass in encode/decode: activations stay ~30 MB


def train_run(run_dir, X: np.ndarray, model_cfg: ModelConfig, train_cfg: TrainConfig, *,
              X_test: np.ndarray | None = None, t_test: np.ndarray | None = None,
              closed: bool = False, data_info: dict | None = None, force: bool = False,
              progress: bool = False, ctx: Context = SINGLE,
              prune: bool = False) -> Trainer:
    """Train one model from scratch into ``run_dir``; returns the trainer.

    ``ctx``: under ``torchrun``, every rank calls this with the same arguments; they train the
    model data-parallel and rank 0 alone writes the run folder.

    ``X`` may be an ``np.memmap`` (a ``.npy`` file opened with :func:`moeae.data.open_npy`):
    its rows are read a working set at a time, and the run folder records the file's path
    instead of a copy of the data. Without ``X_test``, snapshots and metrics use the training
    data, or a fixed sample of :data:`EVAL_MAX` points of it when it is larger.

    ``prune``: at the end, charts the router picks for no training point are switched off
    (:func:`switch_off_unused`; ``moeae train --experts auto``), and the last epoch's row,
    snapshot and checkpoint are written again.
    """
    run_dir = Path(run_dir)
    mapped = isinstance(X, np.memmap)
    filename = str(X.filename) if isinstance(X, np.memmap) else None
    if not mapped:
        X = np.asarray(X, dtype=np.float64)
    model_cfg = dataclasses.replace(model_cfg, n_features=X.shape[1])
    train_cfg = with_budget(model_cfg, train_cfg, len(X))
    check_configs(model_cfg, train_cfg, *X.shape)
    info = data_info or {}
    check_trainable(X, str(info.get("file") or info.get("name") or "X"),
                 n_charts=model_cfg.n_experts)
    device = resolve_device(train_cfg.device)
    data_info = dict(data_info or {})
    if mapped:
        data_info.update(file=str(Path(str(filename)).resolve()), shape=list(X.shape),
                         dtype=str(X.dtype), mapped=True)
    config = to_dict(model_cfg, train_cfg, data=data_info, closed=closed)
    arrays = {} if mapped else {"X_train": X}
    if X_test is not None:
        arrays["X_test"] = np.asarray(X_test, dtype=np.float64)
    elif mapped or len(X) > EVAL_MAX:  # a copy of a small sample, never of the whole file
        idx = np.arange(len(X)) if len(X) <= EVAL_MAX else np.sort(
            np.random.default_rng(train_cfg.seed).choice(len(X), EVAL_MAX, replace=False))
        arrays["X_eval"] = read_rows(X, idx, np.float64)  # pread: no pages of a map kept
    if t_test is not None:
        arrays["t_test"] = np.asarray(t_test)

    def write_start() -> None:
        _prepare_dir(run_dir, force)
        write_json(run_dir / "config.json", config)
        save_npz(run_dir / "data.npz", arrays)

    if ctx.active and train_cfg.n_init > 1:
        raise ValueError(f"n_init {train_cfg.n_init}: several starts train in one process; "
                         "under torchrun train one start (n_init 1), or a sweep over seeds")
    on_main(ctx, write_start)
    seeds = [train_cfg.seed + i for i in range(train_cfg.n_init)]
    trainer = Trainer(MoEAE(model_cfg, [model_cfg.n_experts] * len(seeds)), train_cfg, seeds,
                      device, ctx=ctx)
    trainer.initialize(X)
    rec = None
    if ctx.is_main:
        rec = _Recorder(run_dir, _eval_set(arrays, X), t_test, closed, config, [])
        rec.checkpoint(trainer)  # epoch 0: a divergence in epoch 1 leaves a good checkpoint
    trainer.fit(X, train_cfg.epochs, on_epoch_end=rec, progress=progress and ctx.is_main)
    trainer = _keep_best(trainer, X, rec)
    if prune and switch_off_unused(trainer.model, X) < model_cfg.n_experts and rec is not None:
        rec(trainer)
    ctx.barrier()
    return trainer


def _keep_best(trainer: Trainer, X, rec: _Recorder | None) -> Trainer:
    """Of a finished population of starts (``n_init``), the one that reconstructs the
    training data best, alone: its row, snapshot and checkpoint replace the last epoch's."""
    if trainer.model.n_models == 1 or trainer.state.epoch < trainer.cfg.epochs:
        return trainer
    one = trainer.keep_member(trainer.best_member(X))
    if rec is not None:
        rec(one)
    return one


def on_main(ctx: Context, fn) -> None:
    """Run ``fn`` on rank 0 alone; an error there is raised on every rank, so no rank waits
    for a run folder that will never be written."""
    err = None
    if ctx.is_main:
        try:
            fn()
        except Exception as exc:  # re-raised below, on every rank
            err = exc
    if ctx.active:
        first = ctx.all_gather_object(None if err is None else str(err))[0]
        if err is None and first is not None:
            raise RunError(first)
    if err is not None:
        raise err


def _eval_set(arrays: dict, X_train=None) -> np.ndarray:
    """The points a run is evaluated on: its test set, else its sample of the training data,
    else the training data."""
    for key in ("X_test", "X_eval", "X_train"):
        if key in arrays:
            return arrays[key]
    if X_train is None:
        raise RunError("data.npz holds no evaluation data")
    return np.asarray(X_train, dtype=np.float64)


def _training_data(run_dir: Path, config: dict, data: dict) -> np.ndarray:
    """A run's training data: its copy in data.npz, or the memory-mapped file it names."""
    if "X_train" in data:
        return data["X_train"]
    info = config.get("data", {})
    if not info.get("mapped") or "file" not in info:
        raise RunError(f"{run_dir / 'data.npz'} has no training data and config.json names "
                       "no data file")
    from .data import open_npy

    X = open_npy(info["file"], scan=False)
    if list(X.shape) != list(info.get("shape", [])):
        raise RunError(f"{info['file']}: shape {tuple(X.shape)} differs from the "
                       f"{tuple(info.get('shape', []))} this run was trained on")
    return X


def _read_run(run_dir: Path) -> tuple[dict, ModelConfig, TrainConfig]:
    if not run_dir.is_dir():
        raise RunError(f"run folder not found: {run_dir}")
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise RunError(f"{run_dir} is not a run folder (no config.json)")
    import json

    try:
        config = json.loads(cfg_path.read_text())
        model_cfg, train_cfg = from_dict(config)
    except (ValueError, TypeError) as exc:
        raise RunError(f"{cfg_path}: unreadable config ({exc})") from None
    return config, model_cfg, train_cfg


def resume_run(run_dir, epochs: int | None = None, progress: bool = False,
               ctx: Context = SINGLE) -> Trainer:
    """Continue a run from its last complete checkpoint to ``epochs`` total epochs (default:
    the planned number). Schedules run over the plan in config.json, so a resume that keeps
    the plan is bit-identical to an uninterrupted run; one that extends it is bit-identical
    for constant schedules (the seed recipe)."""
    run_dir = Path(run_dir)
    config, model_cfg, train_cfg = _read_run(run_dir)
    ck = load_checkpoint(run_dir / "checkpoint.safetensors")
    data = load_npz(run_dir / "data.npz")
    if epochs is not None:
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        train_cfg.epochs = epochs
        config["train"]["epochs"] = epochs
    try:
        seeds = [int(s) for s in ck["meta"]["state"]["seeds"]]  # several while n_init starts
        trainer = Trainer(MoEAE(model_cfg, [model_cfg.n_experts] * len(seeds)), train_cfg,
                          seeds, resolve_device(train_cfg.device), ctx=ctx)
        trainer.load_state_dict({"model": ck["model"], "optimizer": ck["optimizer"],
                                 "rng": ck["rng"], "extra": ck["extra"],
                                 "state": ck["meta"]["state"]})
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{run_dir / 'checkpoint.safetensors'} does not match "
                              f"config.json ({str(exc).splitlines()[0]})") from None
    done = trainer.state.epoch
    if train_cfg.epochs < done:
        raise ValueError(f"{run_dir} already has {done} epochs; --epochs {train_cfg.epochs} "
                         "would go back")
    metrics_path = run_dir / "metrics.json"
    rows = []
    if metrics_path.is_file():
        import json

        try:
            rows = [r for r in json.loads(metrics_path.read_text()) if r["epoch"] <= done]
        except (ValueError, TypeError, KeyError) as exc:
            raise RunError(f"{metrics_path}: unreadable metrics ({exc!r})") from None
    X = _training_data(run_dir, config, data)
    ctx.barrier()  # every rank has read the run folder before rank 0 changes it

    def write_start() -> None:
        if epochs is not None:  # only now, so a refused resume leaves config.json as it was
            write_json(run_dir / "config.json", config)
        _remove_stale_tmp(run_dir)

    on_main(ctx, write_start)
    rec = None
    if ctx.is_main:
        rec = _Recorder(run_dir, _eval_set(data, X), data.get("t_test"),
                        bool(config.get("closed", False)), config, rows)
    trainer.fit(X, train_cfg.epochs, on_epoch_end=rec, progress=progress and ctx.is_main)
    trainer = _keep_best(trainer, X, rec)
    ctx.barrier()
    return trainer


def load_model(run_dir, device: str = "cpu") -> tuple[MoEAE, dict]:
    """The trained model of a run (eval mode, float64, on ``device``) and its config dict.

    Inference runs in float64: float32 matmuls round differently for different batch sizes,
    and a point's code should not depend on which other points are encoded with it."""
    run_dir = Path(run_dir)
    config, model_cfg, _ = _read_run(run_dir)
    ck = load_checkpoint(run_dir / "checkpoint.safetensors")
    starts = len(ck["meta"].get("state", {}).get("seeds", [0]))
    if starts > 1:
        raise RunError(f"{run_dir} holds {starts} starts still in training (n_init); finish "
                       f"it with: moeae train --resume {run_dir}")
    model = MoEAE(model_cfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{run_dir / 'checkpoint.safetensors'} does not match "
                              f"config.json ({str(exc).splitlines()[0]})") from None
    return model.double().eval().to(resolve_device(device)), config


def charts_in_use(model: MoEAE, X, chunk: int = 65536) -> np.ndarray:
    """Which charts of a model (a population of one) the router picks for some point of X
    (an array or memory map, read ``chunk`` rows at a time): bool (E,)."""
    used = np.zeros(model.counts[0], dtype=bool)
    for i in range(0, len(X), chunk):
        used[np.unique(encode(model, X[i:i + chunk])[:, 0].astype(np.int64))] = True
    return used


def switch_off_unused(model: MoEAE, X) -> int:
    """Let the router pick only the charts it picks for some point of X (training data):
    a chart no point uses is switched off rather than kept as a dead code. Returns the
    charts in use."""
    used = charts_in_use(model, X)
    if used.any() and not used.all():
        with torch.no_grad():
            model.active[0] = torch.as_tensor(used, device=model.active.device)
    return int(model.active[0].sum())


def encode(model: MoEAE, X: np.ndarray, chunk: int = CODE_CHUNK) -> np.ndarray:
    """X (n, d) -> codes (n, 1 + k): chart index, then the chart's coordinates.

    Runs in chunks of ``chunk`` points on the model's device; X may be memory-mapped."""
    out = np.empty((len(X), 1 + model.cfg.latent_dim))
    for i in range(0, len(X), chunk):
        rows = np.array(X[i:i + chunk], dtype=np.float64)  # a copy: X may be a read-only map
        release_pages(X)
        x = as_population(rows, model.shift.dtype).to(model.shift.device)
        chart, z = model.encode(x)
        out[i:i + chunk, 0] = chart[0].cpu().numpy()
        out[i:i + chunk, 1:] = z[0].double().cpu().numpy()
    return out


def decode(model: MoEAE, codes: np.ndarray, chunk: int = CODE_CHUNK,
           first_row: int = 0) -> np.ndarray:
    """codes (n, 1 + k) -> X (n, d), decoded by the chart each code names (``first_row``:
    the row number of ``codes[0]`` in the file, for messages)."""
    codes = np.asarray(codes, dtype=np.float64)
    k, E = model.cfg.latent_dim, model.counts[0]
    if codes.ndim != 2 or codes.shape[1] != 1 + k:
        raise ValueError(f"codes must have shape (n, {1 + k}) (chart, then {k} coordinate(s)),"
                         f" got {codes.shape}")
    chart = codes[:, 0]
    bad = (chart != np.round(chart)) | (chart < 0) | (chart >= E)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        what = "is not a whole number" if chart[i] != np.round(chart[i]) else "is out of range"
        raise ValueError(f"chart index {codes[i, 0]:g} in row {first_row + i} {what}: the "
                         f"model has charts 0..{E - 1}")
    device, dtype = model.shift.device, model.shift.dtype
    out = np.empty((len(codes), model.cfg.n_features))
    for i in range(0, len(codes), chunk):
        c = torch.tensor(chart[i:i + chunk].astype(np.int64), device=device)[None]
        z = torch.tensor(codes[i:i + chunk, 1:], dtype=dtype, device=device)[None]  # a copy
        out[i:i + chunk] = model.decode(c, z)[0].double().cpu().numpy()
    return out


def evaluate_run(run_dir, X: np.ndarray | None = None, t=None, closed: bool | None = None,
                 device: str = "cpu") -> dict:
    """Metrics of a run's model on X (default: the run's own evaluation set)."""
    run_dir = Path(run_dir)
    model, config = load_model(run_dir, device)
    if X is None:
        data = load_npz(run_dir / "data.npz")
        X = _eval_set(data)
        t = data.get("t_test") if t is None else t
    closed = bool(config.get("closed", False)) if closed is None else closed
    snap = _snapshot(model, as_population(X, model.shift.dtype))
    from .transitions import atlas_metrics

    return {**snapshot_metrics(snap, t, closed), **atlas_metrics(model, X)}
