"""One model on one process against the same command data-parallel on N ranks (torchrun).

    python benchmarks/bench_distributed.py [--n 20000] [--ranks 2] [--device cpu]

Trains ``moeae train`` on n points of a noisy closed curve in 10-D (noise 0.01, 4 charts) in
one process and under ``torchrun --standalone --nproc_per_node=RANKS``, then encodes and
decodes a clean, evenly spaced test curve with each run: wall time of each command, hard FVU
of each, and their ratios. On a CPU the ranks share its cores, so the comparison is of quality
(the same training, split), not of speed; on GPUs each rank has its own.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moeae import datasets as ds


def fvu(T: np.ndarray, R: np.ndarray) -> float:
    return float(((T - R) ** 2).sum(1).mean() / ((T - T.mean(0)) ** 2).sum(1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    X, _ = ds.make_circle(args.n, random_state=args.seed)
    Y = ds.embed(X, 10, random_state=0)
    Y = Y + 0.01 * np.random.default_rng(args.seed).standard_normal(Y.shape)
    G, _ = ds.make_circle(1000, grid=True)
    T = ds.embed(G, 10, random_state=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        np.save(work / "X.npy", Y)
        np.save(work / "T.npy", T)
        train = ["-m", "moeae", "train", "--data", str(work / "X.npy"), "--experts", "4",
                 "--seed", str(args.seed), "--device", args.device, "--threads", "1"]
        launchers = {"1 process": [sys.executable],
                     f"{args.ranks} ranks": [sys.executable, "-m", "torch.distributed.run",
                                             "--standalone",
                                             f"--nproc_per_node={args.ranks}"]}
        res = {}
        for name, launch in launchers.items():
            run = work / name.replace(" ", "_")
            t0 = time.perf_counter()
            p = subprocess.run(launch + train + ["--out", str(run)], env=env,
                               capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                sys.exit(p.stderr)
            for cmd, src, dst in (("encode", "T.npy", "Z.npy"), ("decode", "Z.npy", "R.npy")):
                subprocess.run([sys.executable, "-m", "moeae", cmd, str(run), str(work / src),
                                str(work / dst)], check=True, capture_output=True)
            res[name] = (wall, fvu(T, np.load(work / "R.npy")))
            print(f"{name:<10} moeae train on {args.n} points: {wall:6.1f} s, hard FVU of a "
                  f"clean test curve {res[name][1]:.2e}", flush=True)
        (t1, f1), (t2, f2) = res.values()
        print(f"FVU ratio {args.ranks} ranks / 1 process: {f2 / f1:.2f}; time ratio "
              f"{t2 / t1:.2f}")


if __name__ == "__main__":
    main()
