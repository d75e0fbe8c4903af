"""Sweeps: every expert count x seed of one data source, trained as populations, split across
the processes that ``torchrun`` starts.

A sweep trains one model per *setting* (an expert count; the latent width, recipe and budget
are the sweep's) and seed. For a dataset name, seed ``s`` draws its own training sample and
test set exactly as ``moeae train --seed s`` does; for a file or an array every seed trains on
the same points (a ``.npy`` file memory-mapped, read a working set at a time).

Populations. The seeds of one setting are cut, in order, into chunks of at most ``population``
models; each chunk trains as one :class:`~moeae.model.MoEAE` population by one
:class:`~moeae.training.Trainer` (each model with its own seed, data, shuffling and dropout
streams). A model's last float bits depend on which models share its population, and training
amplifies them into visibly different fits, so the chunks are fixed by the sweep alone, never
by the number of processes: every model gets the same numbers in one process or on N ranks.

Ranks. Under ``torchrun`` whole populations are dealt to the ranks by cost, largest first
onto the least loaded rank; there is no gradient exchange. Each rank writes the run folders of
its own models (on several machines ``out`` must be a shared filesystem), the table rows are
gathered on every rank, and rank 0 writes the tables.

Files in ``out``: ``sweep.json`` (what the sweep is: a rerun of the same sweep resumes, a
different one is refused unless forced), ``runs/e{E}-s{seed}/`` (a complete run folder per
model, :mod:`moeae.run`, whose ``metrics.json`` holds the final row and is written last),
``models.csv`` (one row per model) and ``summary.csv`` (one row per setting).

Resume: a model whose folder holds its final metrics row is read back, not trained again; a
population with any other model is trained again from scratch (it is the unit of training),
and only its missing folders are written.

Torch is imported inside the functions that train, so ``import moeae`` imports this module at
once and ``moeae.sweep`` is the function :func:`sweep` (a submodule imported later would
replace a function of the same name in the package).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import recipe as get_recipe
from .config import to_dict, with_budget
from .datasets import get_dataset
from .metrics import aggregate, snapshot_metrics

__all__ = ["sweep", "SweepResult", "summarize", "format_summary",
           "POPULATION", "SUCCESS_FVU"]

POPULATION = 10  # models per population: the unit of training, fixed per sweep
SUCCESS_FVU = 1e-4  # a seed succeeds when its hard FVU is at most this
FORMAT = "moeae-sweep-1"
EVAL_MAX = 2000  # shared data larger than this is evaluated on a fixed sample (as moeae.run)
SETTING = ["n_experts", "latent_dim"]  # the columns that name a setting
_OURS = ("sweep.json", "models.csv", "summary.csv", "runs")  # what --force may remove


@dataclass
class SweepResult:
    """What :func:`sweep` returns (on every rank)."""

    models: list[dict]  # one row per model: setting, seed, population, final metrics
    summary: list[dict]  # one row per setting: means and sds over seeds, success share
    out: Path | None  # the sweep folder, None when nothing was written
    trained: list[str] = field(default_factory=list)  # models trained by this call
    timings: dict = field(default_factory=dict)  # seconds: setup, train (all ranks), total


@dataclass(frozen=True)
class _Model:
    name: str  # run folder name, e.g. "e4-s3"
    n_experts: int
    seed: int
    population: int  # index of its population in the plan


@dataclass
class _Data:
    """One model's data: training points, evaluation points, curve parameter, run info."""

    X: np.ndarray  # (n, d) training points (np.memmap for a mapped file)
    X_eval: np.ndarray  # (n_eval, d) where the metrics are measured
    t: np.ndarray | None  # (n_eval,) the curve parameter of X_eval, if known
    closed: bool
    info: dict  # config.json's "data"
    arrays: dict  # data.npz


class _Source:
    """A dataset name (one sample per seed) or shared points (a file or an array)."""

    def __init__(self, data, n_samples: int, noise: float, seed: int):
        from .data import check_data, load_array

        self.n_samples, self.noise = n_samples, noise
        self.name: str | None = None  # the dataset's name; None: shared points
        self.info: dict[str, Any] = {}  # config.json's "data" of shared points
        X: np.ndarray | None = None
        if isinstance(data, np.ndarray):
            X = data if isinstance(data, np.memmap) else check_data(data, "X", min_samples=2)
            self.info = {"array": True, "shape": list(X.shape)}
        else:
            path = Path(data)
            if path.suffix.lower() in (".npy", ".csv", ".txt") or path.exists():
                X = load_array(path, min_samples=2, mmap=True)  # .npy: memory-mapped
                self.info = {"file": str(path.resolve()), "shape": list(X.shape)}
            else:
                self.dataset = get_dataset(str(data))  # unknown names: the valid ones listed
                self.name = str(data)
        self.X = np.empty((0, 0)) if X is None else X  # (n, d) shared points
        self.mapped = isinstance(X, np.memmap)
        if isinstance(X, np.memmap):
            self.info.update(file=str(Path(str(X.filename)).resolve()), dtype=str(X.dtype),
                             mapped=True)
        n = len(self.X)
        # one evaluation sample for every seed, so their metrics compare
        idx = np.arange(n) if n <= EVAL_MAX else np.sort(
            np.random.default_rng(seed).choice(n, EVAL_MAX, replace=False))
        self.X_eval = np.asarray(self.X[idx], dtype=np.float64)

    def identity(self) -> dict:
        """What must not change for a rerun to resume (sweep.json's "data")."""
        if self.name is not None:
            return {"name": self.name, "n_samples": self.n_samples, "noise": self.noise}
        if "file" in self.info:
            st = Path(self.info["file"]).stat()
            return {"file": self.info["file"], "shape": self.info["shape"], "bytes": st.st_size,
                    "mtime_ns": st.st_mtime_ns}
        import hashlib

        return {"array": list(self.X.shape),
                "sha256": hashlib.sha256(np.ascontiguousarray(self.X).tobytes()).hexdigest()}

    def for_seed(self, seed: int) -> _Data:
        if self.name is None:
            arrays = {} if self.mapped else {"X_train": np.asarray(self.X, dtype=np.float64)}
            if self.mapped or len(self.X) > EVAL_MAX:
                arrays["X_eval"] = self.X_eval
            return _Data(self.X, self.X_eval, None, False, dict(self.info), arrays)
        # as moeae train --data NAME --seed SEED (cli._load_data): a test grid for curves
        ds, n = self.dataset, self.n_samples
        X, _ = ds.make(n, noise=self.noise, random_state=seed)
        if ds.has_grid:
            X_te, t_te = ds.make(n, grid=True)
        else:
            X_te, t_te = ds.make(n, noise=self.noise, random_state=seed + 1)[0], None
        info = {"name": self.name, "n_samples": n, "noise": self.noise, "random_state": seed,
                "manifold_dim": ds.manifold_dim}
        arrays = {"X_train": X, "X_test": X_te} | ({} if t_te is None else {"t_test": t_te})
        return _Data(X, X_te, t_te, ds.closed, info, arrays)


def _plan(experts: list[int], seeds: list[int], population: int) -> list[list[_Model]]:
    """Populations: each setting's seeds cut in order into chunks of ``population``."""
    plan: list[list[_Model]] = []
    for E in experts:
        for i in range(0, len(seeds), population):
            plan.append([_Model(f"e{E}-s{s}", E, s, len(plan))
                         for s in seeds[i:i + population]])
    return plan


def _deal(costs: list[float], ranks: int) -> list[list[int]]:
    """Item indices for each of ``ranks`` ranks: largest cost first onto the least loaded rank
    (ties: the lower rank), each rank's items in order. Depends on the costs alone."""
    load = [0.0] * ranks
    mine: list[list[int]] = [[] for _ in range(ranks)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = load.index(min(load))
        load[r] += costs[i]
        mine[r].append(i)
    return [sorted(m) for m in mine]


def _write_run(run_dir: Path, trainer, i: int, config: dict, data: _Data, snap: dict,
               row: dict) -> None:
    """Model ``i``'s run folder, as :func:`moeae.run.train_run` leaves one; metrics.json last,
    so a folder holding its final metrics row is complete."""
    from . import __version__
    from .checkpoint import save_checkpoint, save_npz, write_json

    if run_dir.exists():  # an incomplete folder of an earlier, killed sweep
        shutil.rmtree(run_dir)
    write_json(run_dir / "config.json", config)
    save_npz(run_dir / "data.npz", data.arrays)
    save_npz(run_dir / "snapshots" / f"epoch_{row['epoch']:04d}.npz", snap)
    from .training import member_state

    sd = member_state(trainer, i)
    save_checkpoint(run_dir / "checkpoint.safetensors", model=sd["model"],
                    optimizer=sd["optimizer"], rng=sd["rng"], extra_tensors=sd["extra"],
                    meta={"state": sd["state"], "config": config, "version": __version__})
    write_json(run_dir / "metrics.json", [row])


def _train_population(pop: list[_Model], source: _Source, model_cfg, train_cfg, device,
                      out: Path | None, write: set[str], progress: bool) -> dict[str, dict]:
    """Train one population, measure each model, write the folders named in ``write``;
    returns each model's final metrics row by name."""
    import torch

    from .model import MoEAE
    from .training import DivergenceError, Trainer, evaluate

    E = pop[0].n_experts
    mc = dataclasses.replace(model_cfg, n_experts=E)
    datas = [source.for_seed(m.seed) for m in pop]
    # per-model samples (M, n, d), or the shared points (n, d) that every model reads
    X = source.X if source.name is None else torch.as_tensor(np.stack([d.X for d in datas]))
    X_eval = torch.as_tensor(np.stack([d.X_eval for d in datas]), dtype=torch.float32)
    trainer = Trainer(MoEAE(mc, [E] * len(pop)), train_cfg, [m.seed for m in pop], device)
    trainer.initialize(X)
    try:
        trainer.fit(X, train_cfg.epochs, progress=progress)
    except DivergenceError as exc:  # name the models as their run folders
        raise DivergenceError(exc.epoch, exc.step, [pop[i].name for i in exc.models]) from None
    ev = evaluate(trainer.model, X_eval)
    history = trainer.state.history
    rows = {}
    for i, (m, data) in enumerate(zip(pop, datas)):
        snap = {k: v[i] for k, v in ev.items()}
        if data.t is not None:
            snap["t"] = data.t
        loss = float(history[-1][i]) if history else math.nan
        rows[m.name] = {"epoch": trainer.state.epoch, "train_loss": loss,
                        **snapshot_metrics(snap, data.t, data.closed)}
        if out is not None and m.name in write:
            tc = dataclasses.replace(train_cfg, seed=m.seed)
            config = to_dict(mc, tc, data=data.info, closed=data.closed,
                             population=[p.name for p in pop])
            _write_run(out / "runs" / m.name, trainer, i, config, data, snap, rows[m.name])
    return rows


def _finished(run_dir: Path, epochs: int) -> dict | None:
    """The final metrics row of a complete run folder, else None."""
    try:
        rows = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    row = next((r for r in rows if isinstance(r, dict) and r.get("epoch") == epochs), None)
    files = ("config.json", "data.npz", "checkpoint.safetensors")
    if row is None or not all((run_dir / f).is_file() for f in files):
        return None
    return row


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict) and prefix.count(".") < 2:
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _open_out(out: Path, manifest: dict, force: bool, plan, epochs: int) -> dict[str, dict]:
    """Make ``out`` this sweep's folder; return the rows of the models already complete."""
    from .checkpoint import write_json
    from .run import RunError, remove_own_files

    if out.exists() and not out.is_dir():
        raise RunError(f"{out} exists and is not a folder")
    path = out / "sweep.json"
    if out.is_dir() and any(out.iterdir()):
        if force:
            remove_own_files(out, _OURS)
        else:
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError):
                raise RunError(f"sweep folder {out} is not empty and holds no readable "
                               "sweep.json; use --force to overwrite it or another --out"
                               ) from None
            # JSON both ways: tuples and lists, ints and floats compare as they are stored
            diff = _differences(old, json.loads(json.dumps(manifest)))
            if diff:
                raise RunError(f"{out} holds another sweep (it differs in {', '.join(diff)}); "
                               "use --force to overwrite it or another --out")
    write_json(path, manifest)
    done = {}
    for pop in plan:
        for m in pop:
            row = _finished(out / "runs" / m.name, epochs)
            if row is not None:
                done[m.name] = row
    return done


def _picklable(exc: BaseException, rank: int) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - send what can be sent
        from .distributed import DistributedError

        return DistributedError(f"rank {rank}: {type(exc).__name__}: {exc}")


def _everywhere(ctx, fn):
    """``fn()`` on this rank; every rank's value, or the first failure (by rank) raised on
    every rank. Each rank reaches the collective even when ``fn`` fails, so a failure is an
    error on all of them at once, not a wait for the timeout."""
    value, error = None, None
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - forwarded to every rank, raised below
        error = _picklable(exc, ctx.rank)
    results = ctx.all_gather_object((value, error))
    for _, err in results:
        if err is not None:
            raise err
    return [v for v, _ in results]


def _check_counts(experts, seeds, population, success_fvu) -> list[int]:
    """The expert counts as a list of ints; each bad value is a one-line error."""
    experts = [experts] if isinstance(experts, (int, np.integer)) else list(experts)

    def whole(v, low: int = 1) -> bool:
        return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and bool(v >= low)

    for name, v in (("seeds", seeds), ("population", population)):
        if not whole(v):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not experts or not all(whole(E) for E in experts):
        raise ValueError(f"experts must be one or more integers >= 1, got {experts!r}")
    if len(set(experts)) < len(experts):
        raise ValueError(f"experts lists an expert count twice: {experts}")
    if not (success_fvu > 0 and math.isfinite(success_fvu)):
        raise ValueError(f"success_fvu must be a finite number > 0, got {success_fvu!r}")
    return [int(E) for E in experts]


def sweep(data, experts, seeds: int = 10, *, seed: int = 0, latent_dim: int | None = None,
          recipe: str = "best", epochs: int | None = None, out=None, n_samples: int = 1000,
          noise: float = 0.0, population: int = POPULATION, success_fvu: float = SUCCESS_FVU,
          force: bool = False, device: str = "auto", progress: bool = False, context=None,
          **overrides) -> SweepResult:
    """Train every expert count x seed as populations; return (and write) the tables.

    Parameters
    ----------
    data : str, path or array (n, d)
        A dataset name (seed ``s`` draws its own sample, as ``moeae train --seed s``), a
        ``.npy``/``.csv`` file or an array shared by every seed.
    experts : int or sequence of int
        The expert counts to compare (one setting each).
    seeds : int
        Models per setting, seeds ``seed, seed + 1, ...``; one start each (no ``n_init``).
    latent_dim : int, optional
        Default: the dataset's manifold dimension, else 1.
    recipe, epochs, n_samples, noise
        As ``moeae train``; ``**overrides`` sets other config fields (``lr``, ``batch_size``,
        ``grad_clip``, ``working_set``, ...).
    out : path, optional
        The sweep folder (see the module docstring); None writes nothing.
    population : int
        Models per population, the unit of training. The numbers depend on it (and not on the
        number of processes): keep it fixed to compare or resume sweeps.
    success_fvu : float
        ``summary``'s ``success_share`` is the share of seeds with hard FVU at most this.
    force : bool
        Overwrite the sweep files of a non-empty ``out`` that holds another sweep.
    device : "auto", "cpu" or "cuda"
        Under torchrun each rank trains on its own device (cuda:LOCAL_RANK).
    context : moeae.distributed.Context, optional
        Default: :func:`moeae.distributed.init` (the process group when launched by torchrun;
        the caller ends it with ``moeae.distributed.shutdown()``).

    Returns
    -------
    SweepResult
        The same tables on every rank; rank 0 wrote them.
    """
    t0 = time.perf_counter()
    experts = _check_counts(experts, seeds, population, success_fvu)
    from . import distributed
    from .data import check_trainable
    from .run import check_configs
    from .training import resolve_device

    source = _Source(data, n_samples, noise, seed)
    first = source.for_seed(seed)
    n, d = first.X.shape
    k = latent_dim if latent_dim is not None else first.info.get("manifold_dim", 1)
    model_cfg, train_cfg = get_recipe(recipe, latent_dim=k, epochs=epochs, device=device,
                                      **overrides)
    model_cfg.n_features = d
    train_cfg = with_budget(model_cfg, train_cfg, n)
    for E in experts:
        check_configs(dataclasses.replace(model_cfg, n_experts=E), train_cfg, n, d)
    if source.name is None:  # as train refuses it: nothing to learn, or values too large
        check_trainable(source.X, str(source.info.get("file", "X")), n_charts=max(experts))
    plan = _plan(experts, list(range(seed, seed + seeds)), population)
    configs = to_dict(model_cfg, train_cfg)
    del configs["model"]["n_experts"], configs["train"]["seed"]  # listed in the manifest
    del configs["train"]["device"]  # free to change between runs
    manifest = {"format": FORMAT, "data": source.identity(), "experts": experts,
                "seeds": [seed + i for i in range(seeds)], "population": population,
                "config": configs}

    ctx = context or distributed.init(device)
    dev = resolve_device(device) if ctx is distributed.SINGLE else ctx.device
    out = None if out is None else Path(out)
    done: dict[str, dict] = {}
    if out is not None:
        def prepare():
            return _open_out(out, manifest, force, plan, train_cfg.epochs) if ctx.is_main \
                else None
        done = _everywhere(ctx, prepare)[0]
    todo = [pop for pop in plan if any(m.name not in done for m in pop)]
    mine = _deal([len(p) * (1 + 2 * p[0].n_experts) for p in todo], ctx.world_size)[ctx.rank]
    t1 = time.perf_counter()

    def train() -> dict[str, dict]:
        rows: dict[str, dict] = {}
        for i in mine:
            write = {m.name for m in todo[i] if m.name not in done}
            rows.update(_train_population(todo[i], source, model_cfg, train_cfg, dev, out,
                                          write, progress and ctx.is_main))
        return rows

    rows = dict(done)
    for part in _everywhere(ctx, train):
        rows.update({name: row for name, row in part.items() if name not in done})
    t2 = time.perf_counter()
    models = [{"model": m.name, "n_experts": m.n_experts, "latent_dim": k, "seed": m.seed,
               "population": m.population, **rows[m.name]} for pop in plan for m in pop]
    summary = summarize(models, success_fvu)
    if out is not None and ctx.is_main:
        from .atomic import write_csv

        write_csv(out / "models.csv", models)
        write_csv(out / "summary.csv", summary)
    trained = [m.name for pop in todo for m in pop if m.name not in done]
    return SweepResult(models, summary, out, trained,
                       {"setup": t1 - t0, "train": t2 - t1, "total": time.perf_counter() - t0,
                        "processes": ctx.world_size, "populations": len(todo)})


def summarize(models: list[dict], success_fvu: float = SUCCESS_FVU) -> list[dict]:
    """One row per setting: ``n_seeds``, ``success_share`` (share of seeds with
    ``fvu_hard <= success_fvu``), the best seed (lowest hard FVU) and its FVU, the worst hard
    FVU, then the mean and sd (``_sd``, ddof=1) over seeds of every metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in models:
        groups.setdefault(tuple(r[c] for c in SETTING), []).append(r)
    out = []
    for key, rs in groups.items():
        metrics = [{c: v for c, v in r.items() if c not in ("model", "population", "epoch")}
                   for r in rs]
        mean = aggregate(metrics, SETTING)[0]
        fvu = np.array([r["fvu_hard"] for r in rs], dtype=np.float64)
        ranked = np.where(np.isnan(fvu), np.inf, fvu)  # a NaN never counts as the best
        best = int(np.argmin(ranked))
        row = dict(zip(SETTING, key))
        row.update(n_seeds=len(rs), success_share=float(np.mean(fvu <= success_fvu)),
                   best_seed=rs[best]["seed"], best_fvu_hard=float(fvu[best]),
                   worst_fvu_hard=float(np.max(ranked)))
        row.update({c: v for c, v in mean.items() if c not in row})
        out.append(row)
    return out


def format_summary(summary: list[dict], success_fvu: float = SUCCESS_FVU) -> str:
    """The summary as a short text table."""
    head = (f"{'experts':>7} {'latent':>6} {'seeds':>5} {'success':>7} {'fvu_hard':>9} "
            f"{'sd':>9} {'best':>5} {'best_fvu':>9} {'worst_fvu':>9}")
    lines = [f"success: hard FVU <= {success_fvu:g}", head]
    for r in summary:
        lines.append(f"{r['n_experts']:>7} {r['latent_dim']:>6} {r['n_seeds']:>5} "
                     f"{r['success_share']:>7.0%} {r['fvu_hard']:>9.3g} "
                     f"{r['fvu_hard_sd']:>9.3g} {r['best_seed']:>5} "
                     f"{r['best_fvu_hard']:>9.3g} {r['worst_fvu_hard']:>9.3g}")
    return "\n".join(lines)


