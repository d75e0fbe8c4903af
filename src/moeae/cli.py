"""The ``moeae`` command line: parses arguments and calls the library.

Exit codes: 0 success; 2 bad usage (argparse); 1 bad data, file, checkpoint or a diverged run,
with one line ``error: ...`` on stderr (a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import sys
import warnings
from pathlib import Path

from .arguments import (  # noqa: F401 - the parser, re-exported where it always was
    TRAIN_DEFAULTS,
    build_parser,
    resolve_threads,
    show_progress,
)

__all__ = ["main", "build_parser"]


def _load_data(spec: str, n_samples: int, noise: float, seed: int):
    """(X_train, X_test, t_test, closed, info) for a dataset name or a file."""
    from .data import load_array
    from .datasets import DATASETS, get_dataset

    path = Path(spec)
    if path.suffix.lower() in (".npy", ".csv", ".txt") or path.exists():
        X = load_array(path, min_samples=2, mmap=True)  # a .npy file is memory-mapped
        return X, None, None, False, {"file": str(path.resolve()), "shape": list(X.shape)}
    if spec.replace("-", "_").lower() not in DATASETS and spec not in ("figure-8",):
        raise ValueError(f"unknown dataset {spec!r} and no such file; valid names: "
                         f"{', '.join(DATASETS)}")
    info = get_dataset(spec)
    X, _ = info.make(n_samples, noise=noise, random_state=seed)
    if info.has_grid:
        X_te, t_te = info.make(n_samples, grid=True)
    else:
        X_te, t_te = info.make(n_samples, noise=noise, random_state=seed + 1)
        t_te = None
    return X, X_te, t_te, info.closed, {"name": spec, "n_samples": n_samples, "noise": noise,
                                         "random_state": seed, "manifold_dim": info.manifold_dim}


def _print_metrics(m: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(m, indent=2))
        return
    width = max(len(k) for k in m)
    for k, v in m.items():
        print(f"{k:<{width}}  {v:.6g}" if isinstance(v, float) else f"{k:<{width}}  {v}")


def figure_worker():
    """A forked process that imports matplotlib while this one imports torch and trains, then
    draws the figures (forking once more to draw two groups side by side: matplotlib is
    single-threaded). None where fork is unavailable: the study then draws them itself."""
    from .workers import Worker, can_fork

    return Worker(initializer=_import_plot) if can_fork() else None


def _import_plot() -> None:
    from . import _draw, plot  # noqa: F401


def cmd_reproduce(args, figures=None) -> int:
    from .study import StudySpec, run_study

    spec = StudySpec(out=Path(args.out), recipe=args.recipe, epochs=args.epochs, seed=args.seed,
                     seeds=args.seeds, device=args.device, figures=not args.no_figures,
                     processes=args.threads, progress=show_progress(args))
    table = run_study(spec, figures)
    last = max(r["epoch"] for r in table) if table else 0
    print(f"{'dataset':<8} {'experts':>7} {'mse_soft':>10} {'mse_hard':>10} {'fvu_hard':>10} "
          f"{'used':>4}")
    for r in table:
        if r["epoch"] == last:
            print(f"{r['dataset']:<8} {r['n_experts']:>7} {r['mse_soft']:>10.4g} "
                  f"{r['mse_hard']:>10.4g} {r['fvu_hard']:>10.3g} {r['experts_used']:>4g}")
    times = ", ".join(f"{k} {v:.2f}s" if isinstance(v, float) else f"{k} {v}"
                      for k, v in spec.timings.items())
    print(f"wrote {spec.out}/metrics.csv, metrics.json" +
          (", figures/" if spec.figures else "") + f" ({times})")
    return 0


def train_settings(args: argparse.Namespace) -> dict:
    """The settings of ``train``: the --config file's, the command line's over them, then
    :data:`TRAIN_DEFAULTS` for what neither gives (``model.latent_dim`` stays unset: it
    depends on the data)."""
    from .config import merge_settings, read_config_file

    base = read_config_file(args.config) if args.config else {"model": {}, "train": {}}
    given = {"data": args.data, "out": args.out, "recipe": args.recipe, "seed": args.seed,
             "n_samples": args.n_samples, "noise": args.noise,
             "model": {"n_experts": args.experts, "latent_dim": args.latent_dim},
             "train": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                       "grad_clip": args.grad_clip, "working_set": args.working_set,
                       "n_init": args.n_init,
                       "device": args.device}}
    settings = merge_settings(base, given)
    settings["model"].setdefault("n_experts", TRAIN_DEFAULTS["experts"])
    for key in ("recipe", "seed", "n_samples", "noise"):
        settings.setdefault(key, TRAIN_DEFAULTS[key])
    return settings


def cmd_train(args) -> int:
    from .config import isometric_overrides, recipe
    from .data import check_trainable
    from .distributed import init, shutdown
    from .run import check_configs, resume_run, train_run

    st = getattr(args, "settings", None) or {"train": {}}
    # under torchrun: join the other ranks (one model, data-parallel)
    ctx = init(st["train"].get("device") or "auto")
    try:
        if args.resume:
            tr = resume_run(args.resume, args.epochs, progress=show_progress(args), ctx=ctx)
            if ctx.is_main:
                print(f"resumed {args.resume}: {tr.state.epoch} epochs, {tr.state.step} steps")
            return 0
        X, X_te, t_te, closed, info = _load_data(st["data"], st["n_samples"], st["noise"],
                                                 st["seed"])
        st["model"].setdefault("latent_dim", info.get("manifold_dim", 1))
        st["train"].update(isometric_overrides(args.isometric, st["model"]["latent_dim"]))
        auto = st["model"]["n_experts"] == "auto"
        if auto:  # as MoEAutoencoder(n_experts="auto")
            from .atlas import auto_charts

            # the data and settings are checked before the charts are chosen from them
            mc0, tc0 = recipe(st["recipe"], seed=st["seed"], **{**st["model"], "n_experts": 1},
                              **st["train"])
            check_configs(mc0, tc0, len(X), X.shape[1])
            check_trainable(X, st["data"])
            st["model"]["n_experts"], tried = auto_charts(X, st["model"]["latent_dim"],
                                                          st["seed"], tc0.working_set)
            if ctx.is_main:
                n = st["model"]["n_experts"]
                at = tried[n - 1] if len(tried) >= n else None  # its fold and flat ratios
                print(f"--experts auto: {n} chart{'s' * (n > 1)}" + (
                    f" (fold {at['fold']:.2f}, flat {at['flat']:.2f})" if at else ""))

        def fit_with(c: int):
            mc, tc = recipe(st["recipe"], seed=st["seed"], **{**st["model"], "n_experts": c},
                            **st["train"])
            check_trainable(X, st["data"], n_charts=mc.n_experts)  # named as given
            tr = train_run(st["out"], X, mc, tc, X_test=X_te, t_test=t_te, closed=closed,
                           data_info=info, force=args.force or c != first,
                           progress=show_progress(args), ctx=ctx, prune=auto)
            return tr, (_check(tr.model, X, st["seed"], ctx) if auto else {"tear": 1.0})

        first = st["model"]["n_experts"]
        if auto:  # a chart that tears or underfits: one chart more (moeae.tears)
            from .atlas import MAX_CHARTS
            from .tears import shortfall, untorn

            # underfitting counts at the recipe's budget, not where epochs were cut
            tr, fits = untorn(fit_with, first, MAX_CHARTS,
                              underfit=st["train"].get("epochs") is None)
            if ctx.is_main and len(fits) > 1:
                print("--experts auto: " + ", ".join(
                    f"{f['n_charts']} chart(s) " + (
                        f"tore (jump {f['tear']:.1f})" if f["reason"] == "tore" else
                        f"underfit (FVU {f['fvu']:.1e} > {f['fvu_limit']:.0e}, residuals "
                        f"agreeing {f['agreement']:.2f})") for f in fits[:-1])
                    + f": trained {fits[-1]['n_charts']}")
            short = shortfall(fits, ": more epochs (--epochs) or a larger width (width in a "
                              "--config file) may fit closer", ": give --experts N")
            if ctx.is_main and short is not None:
                print(f"--experts auto: {short}")
        else:
            tr, _ = fit_with(first)
        if ctx.is_main:
            ranks = f" on {ctx.world_size} ranks" if ctx.active else ""
            print(f"trained {st['out']}{ranks}: {tr.state.epoch} epochs, {tr.state.step} steps")
        return 0
    finally:
        shutdown()


def _check(model, X, seed: int, ctx) -> dict:
    """:func:`moeae.tears.atlas_check` on (a seeded sample of) the training points; rank 0's
    values on every rank."""
    from .tears import atlas_check

    check = atlas_check(model, X, seed=seed)
    return ctx.all_gather_object(check)[0] if ctx.active else check


def cmd_sweep(args) -> int:
    from . import distributed
    from .sweep import format_summary, sweep

    ctx = distributed.init(args.device)
    try:
        res = sweep(args.data, args.experts, args.seeds, seed=args.seed,
                    latent_dim=args.latent_dim, recipe=args.recipe, epochs=args.epochs,
                    out=args.out, n_samples=args.n_samples, noise=args.noise,
                    population=args.population, success_fvu=args.success_fvu,
                    force=args.force, device=args.device, progress=show_progress(args), context=ctx,
                    lr=args.lr, batch_size=args.batch_size, working_set=args.working_set)
    finally:
        distributed.shutdown()
    if ctx.is_main:
        print(format_summary(res.summary, args.success_fvu))
        t = res.timings
        print(f"wrote {args.out}/models.csv, summary.csv, runs/: trained {len(res.trained)} of "
              f"{len(res.models)} models ({t['populations']} population(s) on "
              f"{t['processes']} process(es)) in {t['total']:.1f} s")
    return 0


def _stream(input_path, output_path, width_in, width_out, header, fn) -> int:
    """Apply ``fn(rows, first_row) -> rows`` to an input file chunk by chunk into an output
    written atomically: a memory-mapped .npy input of any size streams in bounded memory."""
    import numpy as np

    from .data import SCAN_ROWS, ArrayWriter, load_array
    from .working_set import release_pages

    X = load_array(input_path, n_features=width_in, mmap=True)
    with ArrayWriter(output_path, (len(X), width_out), header) as out:
        for i in range(0, len(X), SCAN_ROWS):
            out.write(fn(np.asarray(X[i:i + SCAN_ROWS]), i))
            release_pages(X)
    return len(X)


def cmd_encode(args) -> int:
    from .run import encode, load_model

    model, _ = load_model(args.run, args.device)
    k = model.cfg.latent_dim
    n = _stream(args.input, args.output, model.cfg.n_features, 1 + k,
                ["chart"] + [f"z{i}" for i in range(k)], lambda rows, _: encode(model, rows))
    print(f"encoded {n} points -> {args.output}")
    return 0


def cmd_decode(args) -> int:
    from .data import DataError
    from .run import decode, load_model

    model, _ = load_model(args.run, args.device)
    d = model.cfg.n_features

    def fn(rows, first):
        try:
            return decode(model, rows, first_row=first)
        except ValueError as exc:
            raise DataError(f"{args.input}: {exc}") from None

    n = _stream(args.input, args.output, None, d,
                [f"x{i}" for i in range(d)], fn)
    print(f"decoded {n} codes -> {args.output}")
    return 0


def _data_for_run(run: str, spec: str):
    """(X, t, closed) of ``--data`` for a trained run: a dataset's test set (seeded apart from
    the run's own data) or a file, checked against the model's width."""
    from .data import DataError
    from .run import load_model

    model, config = load_model(run)
    seed = int(config.get("data", {}).get("random_state", 0)) + 2
    X, X_te, t, closed, _ = _load_data(spec, 1000, 0.0, seed)
    if X_te is not None:
        X = X_te
    if X.shape[1] != model.cfg.n_features:
        raise DataError(f"{spec}: has {X.shape[1]} features but the model expects "
                        f"{model.cfg.n_features}")
    return X, t, closed


def cmd_evaluate(args) -> int:
    from .run import evaluate_run

    X = t = closed = None
    if args.data:
        X, t, closed = _data_for_run(args.run, args.data)
    _print_metrics(evaluate_run(args.run, X, t, closed, device=args.device), args.json)
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_run

    X = t = None
    if args.data:
        X, t, _ = _data_for_run(args.run, args.data)
    print(f"wrote {plot_run(args.run, args.out, X=X, t=t)}")
    return 0


COMMANDS = {"reproduce": cmd_reproduce, "train": cmd_train, "encode": cmd_encode,
            "decode": cmd_decode, "evaluate": cmd_evaluate, "plot": cmd_plot, "sweep": cmd_sweep}


def _freeze_at_exit() -> None:
    """Freeze the garbage collector's heap when the interpreter exits: its final collections
    walk torch's ~165k import-time objects, 0.6-0.8 s of every command's exit on this machine
    (a bare ``import torch`` exits in 1.2-1.5 s with this against 2.0-2.2 s without)."""
    atexit.unregister(gc.freeze)  # once, however often main() runs in one process
    atexit.register(gc.freeze)


def _error(exc: BaseException) -> int:
    """The one line ``error: ...`` of a failed command; exit status 1."""
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    print(f"error: {msg}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run ``moeae`` with ``argv`` (default: the process's arguments); return the exit status."""
    _freeze_at_exit()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":  # usage errors exit 2, as argparse's own
        if args.resume and (args.out or args.data or args.config):
            parser.error("train --resume takes the run folder; do not also give "
                         "--out/--data/--config")
        if not args.resume:
            from .config import ConfigError

            try:
                args.settings = train_settings(args)
            except ConfigError as exc:  # a bad file, not bad usage: exit 1
                if args.debug:
                    raise
                return _error(exc)
            if not (args.settings.get("data") and args.settings.get("out")):
                parser.error("train needs --data and --out, on the command line or in the "
                             "--config file (or --resume RUN_DIR)")
    with warnings.catch_warnings():
        if not args.debug:
            # a library's RuntimeWarning or DeprecationWarning is noise on a command line whose
            # errors are one line each; --debug shows them
            warnings.simplefilter("ignore")
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    figures = None
    if args.command == "reproduce" and not args.no_figures:
        figures = figure_worker()  # before torch: it imports matplotlib meanwhile
    import torch

    if args.command == "reproduce" and args.threads == "auto":
        # processes, not threads: two processes share a busy core gracefully where two
        # threads collapse, so every core is used whatever the load
        args.threads = os.cpu_count() or 1
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # processes torchrun started here
        if args.threads == "auto" and local > 1:  # the cores shared among them
            args.threads = max(1, (os.cpu_count() or 1) // local)
        args.threads = resolve_threads(args.threads)
    torch.set_num_threads(args.threads)
    import signal

    from .checkpoint import CheckpointError
    from .data import DataError
    from .distributed import DistributedError, launched
    from .run import RunError
    from .training import DivergenceError

    def stopped(signum, frame):
        raise DistributedError("stopped by the launcher: another process of this job "
                               "failed (its rank and cause are in the launcher's report)")

    if launched():  # torchrun stops the other ranks with SIGTERM when one of them fails
        signal.signal(signal.SIGTERM, stopped)

    try:
        if args.command == "reproduce":
            return cmd_reproduce(args, figures)
        return COMMANDS[args.command](args)
    except (DataError, RunError, CheckpointError, DivergenceError, DistributedError, ValueError,
            TypeError, OSError) as exc:
        if args.debug:
            raise
        return _error(exc)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        if figures is not None:
            figures.close()
        if launched():  # the command is over: a SIGTERM while exiting just ends the process
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
