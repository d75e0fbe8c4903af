"""The seed study (``moeae reproduce``): curves x expert counts x seeds, as one population.

Every configuration and seed is one model of a single :class:`~moeae.model.MoEAE` population,
trained by one :class:`~moeae.training.Trainer`: each model gets exactly the updates it would
get alone (own seed, own shuffling and dropout streams), but all share one batched program.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ._draw import draw_groups
from .atomic import write_csv
from .checkpoint import save_npz, write_json
from .config import ModelConfig, TrainConfig, to_dict
from .config import recipe as get_recipe
from .datasets import get_dataset
from .metrics import aggregate, snapshot_metrics
from .model import MoEAE
from .training import DivergenceError, Trainer, evaluate, resolve_device
from .workers import can_fork, fork_map

__all__ = ["StudySpec", "run_study", "SEED_DATASETS", "SEED_EXPERTS"]

SEED_DATASETS = ("circle", "figure8", "spiral")  # the seed figure's row order
SEED_EXPERTS = (1, 2, 4, 8)
TABLE_KEYS = ["dataset", "n_experts", "epoch"]


@dataclass
class StudySpec:
    """What ``moeae reproduce`` runs, and where it writes (``timings`` is filled in)."""

    out: Path = Path("results")  #: output folder
    recipe: str = "seed"  #: "seed" | "best"
    epochs: int | None = None  #: None: the recipe's
    seed: int = 0  #: data seed and first model seed
    seeds: int = 1  #: models per configuration (seeds seed, seed+1, ...)
    device: str = "auto"
    datasets: tuple[str, ...] = SEED_DATASETS
    experts: tuple[int, ...] = SEED_EXPERTS
    n_train: int = 1000  #: random training points per curve
    n_test: int = 1000  #: evenly spaced test points per curve
    # the numbers depend on the split, so it is fixed by the device, not by the process count
    shards: int | None = None  #: populations the models form (None: 2 on a CPU, 1 on a GPU)
    processes: int = 1  #: CPU processes that train the shards side by side
    figures: bool = True
    snapshots: bool = True  #: write per-epoch snapshots of the first seed
    progress: bool = False
    timings: dict = field(default_factory=dict)  #: filled in: seconds per phase


def _spread(last: int, most: int) -> list[int]:
    """Epochs 1..last if there are at most ``most``, else ``most`` of them evenly spread,
    the last included: the epochs figure and the table stay readable for long recipes."""
    if last <= most:
        return list(range(1, last + 1))
    return sorted({int(round(e)) for e in np.linspace(1, last, most)})




def _balance(costs: Sequence[float], n: int) -> list[list[int]]:
    """Split items into at most ``n`` groups of similar total cost: largest first onto the
    least loaded group (ties: the earlier group). Each group lists item indices in order."""
    n = max(1, min(n, len(costs)))
    load = [0.0] * n
    groups: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        j = load.index(min(load))
        load[j] += costs[i]
        groups[j].append(i)
    return [sorted(g) for g in groups if g]


def _model_cost(n_experts: int) -> int:
    return 1 + 2 * n_experts  # a router, and an encoder and a decoder per expert


@dataclass
class _Shard:
    """What one process trains: models ``members`` (global index, dataset, experts, seed)."""

    spec: StudySpec
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    data: dict
    members: list[tuple[int, str, int, int]]
    device: torch.device
    threads: int
    progress: bool


def _train_shard(job: _Shard) -> tuple[list[dict], dict, dict]:
    """Train and evaluate one shard's models as one population: (rows, snapshots, timings).

    Rows carry ``_model``, the global model index, for merging shards in a fixed order."""
    torch.set_num_threads(job.threads)
    torch.set_flush_denormal(True)
    spec, data, members = job.spec, job.data, job.members
    t0 = time.perf_counter()
    X_train = torch.tensor(np.stack([data[n][0] for _, n, _, _ in members]), dtype=torch.float32)
    X_test = torch.tensor(np.stack([data[n][1] for _, n, _, _ in members]), dtype=torch.float32)
    model = MoEAE(job.model_cfg, [E for _, _, E, _ in members])
    trainer = Trainer(model, job.train_cfg, [s for _, _, _, s in members], job.device)
    trainer.initialize(X_train)
    timings = {"setup": time.perf_counter() - t0}

    rows: list[dict] = []
    keep: dict[tuple[str, int, int], dict] = {}  # (dataset, E, epoch) -> snapshot, first seed
    last_epoch = job.train_cfg.epochs
    grid_epochs = _spread(last_epoch, 5)  # rows of the epochs figure
    eval_epochs = set(_spread(last_epoch, 10)) | set(grid_epochs)  # rows of the table
    eval_time = [0.0]

    def on_epoch_end(tr: Trainer) -> None:
        epoch = tr.state.epoch
        if epoch not in eval_epochs:
            return
        te = time.perf_counter()
        ev = evaluate(tr.model, X_test)
        for i, (gi, name, E, seed) in enumerate(members):
            snap = {k: v[i] for k, v in ev.items()}
            if E < snap["probs"].shape[1]:  # drop the padding of narrower models
                snap["probs"] = snap["probs"][:, :E]
                snap["expert_outputs"] = snap["expert_outputs"][:E]
                snap["latents"] = snap["latents"][:E]
            _, _, t_te, closed = data[name]
            m = snapshot_metrics(snap, t_te, closed, neighborhood=epoch == last_epoch,
                                 max_points=500)  # O(n^2): every other grid point
            if spec.recipe == "best":  # the chart graph of the final atlas
                m.update(_atlas_row(tr.model, i, data[name][1], epoch == last_epoch))
            rows.append({"_model": gi, "dataset": name, "n_experts": E, "epoch": epoch,
                         "seed": seed, "train_loss": float(tr.state.history[-1][i]), **m})
            if seed == spec.seed and (epoch == last_epoch or
                                      (name == "circle" and epoch in grid_epochs)):
                snap["t"] = t_te
                keep[(name, E, epoch)] = snap
        eval_time[0] += time.perf_counter() - te

    t1 = time.perf_counter()
    try:
        trainer.fit(X_train, last_epoch, on_epoch_end=on_epoch_end, progress=job.progress)
    except DivergenceError as exc:  # name the models by their place in the whole study
        raise DivergenceError(exc.epoch, exc.step, [members[i][0] for i in exc.models]) from None
    timings["train"] = time.perf_counter() - t1 - eval_time[0]
    timings["evaluate"] = eval_time[0]
    return rows, keep, timings


def _atlas_row(model: MoEAE, i: int, X_test: np.ndarray, final: bool) -> dict:
    """Transition-map metrics of model i (:func:`moeae.transitions.atlas_metrics`), NaN
    before the final epoch."""
    from .transitions import atlas_metrics

    if not final:
        return {k: math.nan for k in ("transitions", "transition_residual_max",
                                      "transitions_reversing", "orientable")}
    return atlas_metrics(model.select(i).double().eval(), X_test)


def _train_shards(jobs: list[_Shard]) -> list[tuple[list[dict], dict, dict]]:
    return [_train_shard(job) for job in jobs]


def run_study(spec: StudySpec, figure_worker=None) -> list[dict]:
    """Train, evaluate, write ``metrics.csv``/``metrics.json`` and figures; return the table.

    The models are split into ``spec.shards`` populations of similar work (by expert count;
    2 on the CPU, 1 on a GPU), and on the CPU up to ``spec.processes`` forked processes train
    them side by side (one torch thread each when there are as many processes as shards).
    The split is fixed by the study, not by the process count, so the numbers are the same
    whatever ``processes`` is: a model's last float bits depend on which models share its
    population (the widest router is padded, a population of one takes another matmul path),
    and training amplifies such rounding differences into visibly different fits.
    ``figure_worker``: an optional :class:`~moeae.workers.Worker` that draws the figures
    (best started before torch is imported, with :mod:`moeae.plot` imported in it: it forks
    once more to draw two groups of figures side by side, without importing matplotlib twice).
    """
    t0 = time.perf_counter()
    out = Path(spec.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a folder")
    if spec.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {spec.seeds}")
    if spec.processes < 1:
        raise ValueError(f"processes must be >= 1, got {spec.processes}")
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
    costs = [_model_cost(E) for _, E, _ in members]
    shards = _balance(costs, spec.shards or (2 if device.type == "cpu" else 1))
    n = min(spec.processes, len(shards)) if device.type == "cpu" and can_fork() else 1
    per_process = _balance([sum(costs[i] for i in sh) for sh in shards], n)  # shards to run
    threads = max(1, spec.processes // len(per_process)) if device.type == "cpu" else 1
    if len(per_process) > 1:
        torch.set_num_threads(1)  # before forking: children must not inherit a thread pool
    jobs = [[_Shard(spec, model_cfg, train_cfg, data, [(i, *members[i]) for i in shards[k]],
                    device, threads, spec.progress and p == 0 and k == ks[0]) for k in ks]
            for p, ks in enumerate(per_process)]
    spec.timings["setup"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    results = [r for rs in fork_map(_train_shards, jobs) for r in rs]
    rows = sorted((r for res in results for r in res[0]), key=lambda r: (r["epoch"], r["_model"]))
    for r in rows:
        del r["_model"]
    keep = {k: v for res in results for k, v in res[1].items()}
    spec.timings["train"] = time.perf_counter() - t1  # wall: training and evaluation
    spec.timings["evaluate"] = sum(r[2]["evaluate"] for r in results) / len(per_process)
    spec.timings["processes"] = len(per_process)

    t2 = time.perf_counter()
    last_epoch = train_cfg.epochs
    out.mkdir(parents=True, exist_ok=True)
    groups = figure_groups(out, keep, spec, last_epoch) if spec.figures and last_epoch else []
    if groups and figure_worker is not None:
        figure_worker.submit(draw_groups, groups)  # drawn there while the files are written
    table = aggregate(rows, TABLE_KEYS) if spec.seeds > 1 else [
        {k: v for k, v in r.items() if k != "seed"} for r in rows]
    write_csv(out / "metrics.csv", table)
    write_json(out / "metrics.json", {"recipe": spec.recipe, "seeds": spec.seeds,
                                      "config": to_dict(model_cfg, train_cfg), "rows": table})
    if spec.seeds > 1:
        write_csv(out / "metrics_per_seed.csv", rows)
    if spec.snapshots:
        for (name, E, epoch), snap in keep.items():
            save_npz(out / "snapshots" / f"{name}_{E}experts_epoch{epoch:03d}.npz", snap)
    spec.timings["write"] = time.perf_counter() - t2
    if groups:
        t3 = time.perf_counter()
        try:
            if figure_worker is None:
                draw_groups(groups)
            else:
                figure_worker.result()
        except Exception:  # noqa: BLE001 - the worker failed: draw them here, they must exist
            if figure_worker is None:
                raise
            draw_groups(groups)
        spec.timings["figures"] = time.perf_counter() - t3  # after the files were written
    spec.timings["total"] = time.perf_counter() - t0
    return table


def figure_groups(out: Path, keep: dict, spec: StudySpec, last: int) -> list[list]:
    """The study's figures as ``draw`` jobs, split into groups of similar size (by panel
    count), one group per CPU core (at most two): matplotlib is single-threaded, so the groups
    are drawn side by side (:func:`moeae._draw.draw_groups`)."""
    fig_dir = out / "figures"
    final = {(n, E): keep[(n, E, last)] for n in spec.datasets for E in spec.experts}
    jobs: list[tuple[int, tuple[str, tuple, dict]]] = []  # (panels, (function, args, kwargs))
    if "circle" in spec.datasets:
        circles = {(e, E): keep[("circle", E, e)] for e in _spread(last, 5)
                   for E in spec.experts}
        jobs.append((len(circles), ("plot_grid_epochs",
                                    (circles, fig_dir / "gridplot-circles.png"),
                                    {"name": "circle"})))
    jobs.append((len(final), ("plot_grid_functions",
                              (final, fig_dir / "gridplot-functions.png"), {})))
    if 1 in spec.experts:
        jobs.append((len(spec.datasets), ("plot_vanilla",
                                          ({n: final[(n, 1)] for n in spec.datasets},
                                           fig_dir / "vanilla_approach.png"), {"epoch": last})))
    if spec.recipe != "seed":
        jobs.append((len(final), ("plot_grid_functions",
                                  (final, fig_dir / "gridplot-functions-hard.png"),
                                  {"reconstruction": "x_hard"})))
        charts = {k: v for k, v in final.items() if k[1] > 1}
        jobs.append((2 * len(charts), ("plot_charts", (charts, fig_dir / "charts.png"), {})))
    groups = _balance([panels for panels, _ in jobs], min(2, os.cpu_count() or 1))
    return [[jobs[i][1] for i in g] for g in groups]
