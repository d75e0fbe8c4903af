"""The seed study (``moeae reproduce``): curves x expert counts x seeds, as one population.

Every configuration and seed is one model of a single :class:`~moeae.model.MoEAE` population,
trained by one :class:`~moeae.training.Trainer`: each model gets exactly the updates it would
get alone (own seed, own shuffling and dropout streams), but all share one batched program.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write_bytes, save_npz, write_json
from .config import recipe as get_recipe
from .config import to_dict
from .datasets import get_dataset
from .metrics import aggregate, snapshot_metrics
from .model import MoEAE
from .training import Trainer, evaluate, resolve_device

__all__ = ["StudySpec", "run_study", "SEED_DATASETS", "SEED_EXPERTS"]

SEED_DATASETS = ("circle", "figure8", "spiral")  # the seed figure's row order
SEED_EXPERTS = (1, 2, 4, 8)
TABLE_KEYS = ["dataset", "n_experts", "epoch"]


@dataclass
class StudySpec:
    out: Path = Path("results")  # output folder
    recipe: str = "seed"  # "seed" | "best"
    epochs: int | None = None  # None: the recipe's
    seed: int = 0  # data seed and first model seed
    seeds: int = 1  # models per configuration (seeds seed, seed+1, ...)
    device: str = "auto"
    datasets: tuple[str, ...] = SEED_DATASETS
    experts: tuple[int, ...] = SEED_EXPERTS
    n_train: int = 1000  # random training points per curve
    n_test: int = 1000  # evenly spaced test points per curve
    figures: bool = True
    snapshots: bool = True  # write per-epoch snapshots of the first seed
    progress: bool = False
    timings: dict = field(default_factory=dict)  # filled in: seconds per phase


def _spread(last: int, most: int) -> list[int]:
    """Epochs 1..last if there are at most ``most``, else ``most`` of them evenly spread,
    the last included: the epochs figure and the table stay readable for long recipes."""
    if last <= most:
        return list(range(1, last + 1))
    return sorted({int(round(e)) for e in np.linspace(1, last, most)})


def _csv_bytes(rows: list[dict]) -> bytes:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def run_study(spec: StudySpec, pool=None) -> list[dict]:
    """Train, evaluate, write ``metrics.csv``/``metrics.json`` and figures; return the table.

    ``pool``: an optional ``multiprocessing`` pool that draws the figures (its workers should
    have imported :mod:`moeae.plot` already); without one, they are drawn here and in one
    forked process."""
    t0 = time.perf_counter()
    out = Path(spec.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a folder")
    if spec.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {spec.seeds}")
    model_cfg, train_cfg = get_recipe(spec.recipe, epochs=spec.epochs, device=spec.device)
    if train_cfg.epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {train_cfg.epochs}")
    device = resolve_device(spec.device)

    # One model per (dataset, experts, seed); data drawn once per dataset.
    data = {}
    for name in spec.datasets:
        info = get_dataset(name)
        X_tr, _ = info.make(spec.n_train, random_state=spec.seed)
        X_te, t_te = info.make(spec.n_test, grid=True)
        data[name] = (X_tr, X_te, t_te, info.closed)
    members = [(name, E, spec.seed + s) for name in spec.datasets for E in spec.experts
               for s in range(spec.seeds)]
    X_train = torch.tensor(np.stack([data[n][0] for n, _, _ in members]), dtype=torch.float32)
    X_test = torch.tensor(np.stack([data[n][1] for n, _, _ in members]), dtype=torch.float32)
    model = MoEAE(model_cfg, [E for _, E, _ in members])
    trainer = Trainer(model, train_cfg, [s for _, _, s in members], device)
    trainer.initialize(X_train)
    spec.timings["setup"] = time.perf_counter() - t0

    rows: list[dict] = []
    keep: dict[tuple[str, int, int], dict] = {}  # (dataset, E, epoch) -> snapshot, first seed
    last_epoch = train_cfg.epochs
    grid_epochs = _spread(last_epoch, 5)  # rows of the epochs figure
    eval_epochs = set(_spread(last_epoch, 10)) | set(grid_epochs)  # rows of the table
    eval_time = [0.0]

    def on_epoch_end(tr: Trainer) -> None:
        epoch = tr.state.epoch
        if epoch not in eval_epochs:
            return
        te = time.perf_counter()
        ev = evaluate(tr.model, X_test)
        for i, (name, E, seed) in enumerate(members):
            snap = {k: v[i] for k, v in ev.items()}
            if E < snap["probs"].shape[1]:  # drop the padding of narrower models
                snap["probs"] = snap["probs"][:, :E]
                snap["expert_outputs"] = snap["expert_outputs"][:E]
                snap["latents"] = snap["latents"][:E]
            _, _, t_te, closed = data[name]
            m = snapshot_metrics(snap, t_te, closed, neighborhood=epoch == last_epoch,
                                 max_points=500)  # O(n^2): every other grid point
            rows.append({"dataset": name, "n_experts": E, "epoch": epoch, "seed": seed,
                         "train_loss": float(tr.state.history[-1][i]), **m})
            if seed == spec.seed and (epoch == last_epoch or
                                      (name == "circle" and epoch in grid_epochs)):
                snap["t"] = t_te
                keep[(name, E, epoch)] = snap
        eval_time[0] += time.perf_counter() - te

    t1 = time.perf_counter()
    trainer.fit(X_train, train_cfg.epochs, on_epoch_end=on_epoch_end, progress=spec.progress)
    spec.timings["train"] = time.perf_counter() - t1 - eval_time[0]
    spec.timings["evaluate"] = eval_time[0]

    t2 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(rows, TABLE_KEYS) if spec.seeds > 1 else [
        {k: v for k, v in r.items() if k != "seed"} for r in rows]
    atomic_write_bytes(out / "metrics.csv", _csv_bytes(table))
    write_json(out / "metrics.json", {"recipe": spec.recipe, "seeds": spec.seeds,
                                      "config": to_dict(model_cfg, train_cfg), "rows": table})
    if spec.seeds > 1:
        atomic_write_bytes(out / "metrics_per_seed.csv", _csv_bytes(rows))
    if spec.snapshots:
        for (name, E, epoch), snap in keep.items():
            save_npz(out / "snapshots" / f"{name}_{E}experts_epoch{epoch:03d}.npz", snap)
    spec.timings["write"] = time.perf_counter() - t2
    if spec.figures and last_epoch > 0:
        t3 = time.perf_counter()
        write_figures(out, keep, spec, last_epoch, pool)
        spec.timings["figures"] = time.perf_counter() - t3
    spec.timings["total"] = time.perf_counter() - t0
    return table


def write_figures(out: Path, keep: dict, spec: StudySpec, last: int, pool=None) -> None:
    """Draw the seed's figures (and, for other recipes, the hard-chart figures).

    With a ``pool``, its workers draw them, slowest first. Otherwise the slowest (the 20-panel
    epochs grid) is drawn in a forked process while this one draws the rest: matplotlib is
    single-threaded and this machine has two cores. A figure a worker failed to draw is drawn
    here: every figure must exist.
    """
    from ._draw import draw

    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    final = {(n, E): keep[(n, E, last)] for n in spec.datasets for E in spec.experts}
    jobs = []  # (plot function, args, kwargs), slowest first
    if "circle" in spec.datasets:
        circles = {(e, E): keep[("circle", E, e)] for e in _spread(last, 5)
                   for E in spec.experts}
        jobs.append(("plot_grid_epochs", (circles, fig_dir / "gridplot-circles.png"),
                     {"name": "circle"}))
    jobs.append(("plot_grid_functions", (final, fig_dir / "gridplot-functions.png"), {}))
    if 1 in spec.experts:
        jobs.append(("plot_vanilla", ({n: final[(n, 1)] for n in spec.datasets},
                                      fig_dir / "vanilla_approach.png"), {"epoch": last}))
    if spec.recipe != "seed":
        jobs.append(("plot_grid_functions", (final, fig_dir / "gridplot-functions-hard.png"),
                     {"reconstruction": "x_hard"}))
        jobs.append(("plot_charts", ({k: v for k, v in final.items() if k[1] > 1},
                                     fig_dir / "charts.png"), {}))
    if pool is not None:
        pending = [(job, pool.apply_async(draw, job)) for job in jobs]
        for job, res in pending:
            try:
                res.get()
            except Exception:  # noqa: BLE001 - a worker failed: draw it here instead
                draw(*job)
        return
    child = _start_forked(jobs[0]) if len(jobs) > 1 else None
    for job in jobs[1 if child else 0:]:
        draw(*job)
    if child is not None:
        child.join()
        if child.exitcode != 0:  # draw it here instead: the figure must exist
            draw(*jobs[0])


def _start_forked(job):
    """Run ``fn(*args, **kwargs)`` in a forked child; None where fork is unavailable."""
    import multiprocessing
    import os

    if os.name != "posix" or (os.cpu_count() or 1) < 2:
        return None
    from ._draw import draw

    proc = multiprocessing.get_context("fork").Process(target=draw, args=job)
    proc.start()
    return proc
