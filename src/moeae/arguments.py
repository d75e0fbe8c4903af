"""The grammar of the ``moeae`` command line: its subcommands, options and value types.

:mod:`moeae.cli` parses with :func:`build_parser` and runs the commands; this module only
declares them, so the reference page of the documentation is generated from it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

__all__ = ["build_parser", "resolve_threads", "show_progress", "TRAIN_DEFAULTS"]


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low`` (a usage error, exit 2, otherwise)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v
    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _auto_or_count(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def resolve_threads(threads: int | str) -> int:
    """'auto': 2 threads when at least two cores sit idle (1-minute load average), else 1.

    Measured on a 2-core machine: the seed study trains in 4.2 s on 2 idle cores against 6.2 s
    on 1, but two threads collapse when another process holds a core."""
    if threads != "auto":
        return int(threads)
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform: be safe
        return 1
    return 2 if cores >= 2 and cores - load >= 1.5 else 1


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


# What `train` uses when neither the command line nor a --config file sets it.
TRAIN_DEFAULTS = {"experts": 4, "seed": 0, "recipe": "best", "n_samples": 1000, "noise": 0.0}


def _add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar on stderr, or not (default: when stderr is a "
                             "terminal)")


def show_progress(args: argparse.Namespace) -> bool:
    """``--progress``/``--no-progress`` as given, else a bar only when stderr is a terminal
    (so logs and pipes do not fill with carriage returns)."""
    if args.progress is not None:
        return bool(args.progress)
    return sys.stderr.isatty()


def build_parser() -> argparse.ArgumentParser:
    """The ``moeae`` argument parser: one subcommand per task."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show full tracebacks on errors (default: one line)")
    common.add_argument("--threads", type=_auto_or_count, default="auto",
                        help="CPU threads for torch, or 'auto': 2 when two cores are idle by the "
                             "load average, else 1 (default: auto; two threads slow down badly "
                             "when another process takes a core: pass 1 on a busy machine); "
                             "reproduce splits its models across this many processes of one "
                             "thread each instead (auto: every core)")
    p = argparse.ArgumentParser(prog="moeae", description="Mixture-of-Experts autoencoders: "
                                "learn an atlas of charts of data on a manifold.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"moeae {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("reproduce", parents=[common], help="run the seed study (3 curves x "
                       "1, 2, 4, 8 experts) and write its figures and metrics")
    r.add_argument("--out", default="results", help="output folder (default: results)")
    r.add_argument("--recipe", choices=["seed", "best"], default="seed",
                   help="seed: faithful to the reference code; best: clean hard charts "
                        "(default: seed)")
    r.add_argument("--epochs", type=_nonneg_int, default=None,
                   help="epochs (default: the recipe's; seed: 5)")
    r.add_argument("--seed", type=int, default=0, help="data and first model seed (default: 0)")
    r.add_argument("--seeds", type=_positive_int, default=1,
                   help="models per configuration, reported as mean and sd (default: 1)")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to train (default: auto = cuda if available)")
    r.add_argument("--no-figures", action="store_true", help="skip the figures")
    _add_progress(r)

    # Settings that a --config file may also give default to None here: only what the command
    # line states overrides the file (the documented defaults are applied after both).
    t = sub.add_parser("train", parents=[common], help="train one model into a run folder")
    t.add_argument("--config", metavar="FILE.toml",
                   help="read the settings from a TOML file; options given here override it")
    t.add_argument("--data", help="a dataset name (circle, spiral, figure8, trefoil, sphere, "
                   "torus, swiss_roll, s_curve) or a .npy/.csv file of shape (n, d)")
    t.add_argument("--experts", type=_auto_or_count, default=None,
                   help="number of experts (charts), or auto: the fewest that cut the data "
                        "without strain, one more where a trained chart tears or underfits, as "
                        "MoEAutoencoder(n_experts='auto') (default: "
                        f"{TRAIN_DEFAULTS['experts']})")
    t.add_argument("--latent-dim", type=_positive_int, default=None,
                   help="coordinates per chart (default: the dataset's dimension, else 1)")
    t.add_argument("--epochs", type=_nonneg_int, default=None,
                   help="epochs (default: the recipe's; with --resume: total epochs to reach)")
    t.add_argument("--seed", type=int, default=None,
                   help=f"random seed (default: {TRAIN_DEFAULTS['seed']})")
    t.add_argument("--recipe", choices=["best", "seed"], default=None,
                   help=f"training recipe (default: {TRAIN_DEFAULTS['recipe']})")
    t.add_argument("--out", help="run folder to create")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue this run folder")
    t.add_argument("--force", action="store_true",
                   help="overwrite the run files of a non-empty --out folder")
    t.add_argument("--n-samples", type=_positive_int, default=None,
                   help="points to generate for a named dataset "
                        f"(default: {TRAIN_DEFAULTS['n_samples']})")
    t.add_argument("--noise", type=float, default=None,
                   help=f"Gaussian noise sd for a named dataset (default: "
                        f"{TRAIN_DEFAULTS['noise']:g})")
    t.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: the recipe's)")
    t.add_argument("--batch-size", type=_positive_int, default=None,
                   help="batch size (default: the recipe's)")
    t.add_argument("--grad-clip", type=_positive_float, default=None,
                   help="clip each step's gradient norm to this (default: off)")
    t.add_argument("--working-set", type=_int_at_least(2), default=None,
                   help="points per epoch; larger data trains each epoch on a fresh random "
                        "sample of this many, so the cost does not grow with the data "
                        "(default: the recipe's, 2000)")
    t.add_argument("--n-init", type=_positive_int, default=None,
                   help="independent starts trained together, the one that reconstructs the "
                        "training data best kept, as MoEAutoencoder(n_init=...) (default: the "
                        "recipe's, 1)")
    t.add_argument("--isometric", type=float, nargs="?", const=1.0, default=None,
                   metavar="WEIGHT",
                   help="charts that keep lengths: for curves, codes are arc length "
                        "(moeae.arclength; the best recipe's default; 0 gives the encoders' "
                        "codes); for surfaces, each decoder keeps lengths up to one scale per "
                        "chart, with a guard against folds (moeae.geometry), WEIGHT of both "
                        "terms, 1 when omitted; 0 turns either off (default: the recipe's)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="where to train (default: auto)")
    _add_progress(t)

    e = sub.add_parser("encode", parents=[common], help="points -> atlas codes (chart, z)")
    e.add_argument("run", help="run folder")
    e.add_argument("input", help=".npy or .csv of shape (n, d)")
    e.add_argument("output", help=".npy or .csv to write, shape (n, 1 + latent_dim)")
    e.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where to run the model (default: cpu)")

    d = sub.add_parser("decode", parents=[common], help="atlas codes -> points")
    d.add_argument("run", help="run folder")
    d.add_argument("input", help=".npy or .csv of codes, shape (n, 1 + latent_dim)")
    d.add_argument("output", help=".npy or .csv to write, shape (n, d)")
    d.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where to run the model (default: cpu)")

    v = sub.add_parser("evaluate", parents=[common], help="print the metrics of a run")
    v.add_argument("run", help="run folder")
    v.add_argument("--data", help="a dataset name or .npy/.csv file (default: the run's own "
                   "test set)")
    v.add_argument("--json", action="store_true", help="print JSON instead of a table")
    v.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where to run the model (default: cpu)")

    g = sub.add_parser("plot", parents=[common], help="draw a run: its hard reconstruction "
                       "coloured by chart, each chart's coordinate, the training loss")
    g.add_argument("run", help="run folder")
    g.add_argument("--data", help="a dataset name or .npy/.csv file to draw (default: the run's "
                   "own test set)")
    g.add_argument("--out", help="figure to write: .png, .pdf or .svg (default: "
                   "RUN_DIR/plot.png)")
    _add_sweep_parser(sub, common)
    return p


def _add_sweep_parser(sub, common) -> None:
    s = sub.add_parser("sweep", parents=[common], help="train every expert count x seed as "
                       "populations: run folders, models.csv and summary.csv (several "
                       "processes or GPUs: torchrun -m moeae sweep ...)")
    s.add_argument("--data", required=True, help="a dataset name (each seed draws its own "
                   "sample, as train --seed does) or a .npy/.csv file (shared by every seed)")
    s.add_argument("--experts", type=_positive_int, nargs="+", required=True,
                   help="the expert counts to compare, one setting each")
    s.add_argument("--latent-dim", type=_positive_int, default=None,
                   help="coordinates per chart (default: the dataset's dimension, else 1)")
    s.add_argument("--seeds", type=_positive_int, default=10,
                   help="models per setting, seeds S, S+1, ..., one start each (default: 10)")
    s.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    s.add_argument("--recipe", choices=["best", "seed"], default="best",
                   help="training recipe (default: best)")
    s.add_argument("--epochs", type=_nonneg_int, default=None,
                   help="epochs (default: the recipe's)")
    s.add_argument("--out", required=True, help="sweep folder; rerun with the same settings "
                   "to resume a killed sweep")
    s.add_argument("--force", action="store_true",
                   help="overwrite the sweep files of a non-empty --out holding another sweep")
    s.add_argument("--population", type=_positive_int, default=10,
                   help="models trained together as one population (default: 10); the numbers "
                        "depend on it and not on the number of processes")
    s.add_argument("--success-fvu", type=_positive_float, default=1e-4,
                   help="a seed succeeds when its hard FVU is at most this (default: 1e-4)")
    s.add_argument("--n-samples", type=_positive_int, default=1000,
                   help="points to generate for a named dataset (default: 1000)")
    s.add_argument("--noise", type=float, default=0.0,
                   help="Gaussian noise sd for a named dataset (default: 0)")
    s.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: the recipe's)")
    s.add_argument("--batch-size", type=_positive_int, default=None,
                   help="batch size (default: the recipe's)")
    s.add_argument("--working-set", type=_int_at_least(2), default=None,
                   help="points per epoch (default: the recipe's, 2000)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to train (default: auto); under torchrun, NCCL and one GPU per "
                        "local rank on cuda, else gloo on the CPU")
    _add_progress(s)
