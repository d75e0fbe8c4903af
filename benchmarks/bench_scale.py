"""Fit time, peak memory and quality as the data grow, and the 10^7-point command line.

    python benchmarks/bench_scale.py [--sizes 1000 10000 100000 1000000] [--big] [--device cpu]

Table: for each data set (a noisy closed curve in 64-D, 4 charts of 1 coordinate; a sphere in
64-D, 4 charts of 2) and each n, one default fit through the Python API from a memory-mapped
float32 ``.npy`` file, in a fresh process: fit seconds, that process's peak resident memory and
hard FVU on clean held-out points (the curve's even grid; 2000 new points of the sphere).
Below the table, how fit time grows with n: the ratio to the smallest n and the slope of
log(time) against log(n) (0: flat, 1: linear).

``--big``: ``moeae train`` on a 10^7 x 64 float32 file (2.6 GB, a noisy closed curve rotated
into 64-D) against the same command on 10^4 points of it: wall time and peak memory of each
command, and hard FVU of the big run's codes of a clean test curve (encode, then decode).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[4]))
from moeae import MoEAutoencoder
path, test, kind, _, device = sys.argv[1:6]
t0 = time.perf_counter()
est = MoEAutoencoder(n_experts=4, latent_dim=1 if kind == "curve" else 2, random_state=0,
                     device=device).fit(path)
fit = time.perf_counter() - t0
T = np.load(test)
R = est.inverse_transform(est.transform(T))
fvu = float(((T - R) ** 2).sum(1).mean() / ((T - T.mean(0)) ** 2).sum(1).mean())
print(json.dumps({"fit_s": fit, "fvu_hard": fvu,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def rotation(dim: int, k: int, seed: int = 0) -> np.ndarray:
    """An orthonormal (k, dim) map: the manifold placed in R^dim."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, k)))
    return q.T


def curve(t: np.ndarray) -> np.ndarray:
    return np.c_[np.cos(t), np.sin(t)]


def sphere(u: np.ndarray) -> np.ndarray:
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def write_data(path: Path, kind: str, n: int, dim: int = 64, noise: float = 0.01,
               seed: int = 0, chunk: int = 1 << 20) -> None:
    """n noisy points of the curve or sphere in R^dim, float32, written chunk by chunk."""
    rng = np.random.default_rng(seed)
    Q = rotation(dim, 2 if kind == "curve" else 3)
    out = np.lib.format.open_memmap(path, "w+", np.float32, (n, dim))
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        base = curve(rng.uniform(0, 2 * np.pi, m)) if kind == "curve" else \
            sphere(rng.standard_normal((m, 3)))
        out[i:i + m] = base @ Q + noise * rng.standard_normal((m, dim))
    out.flush()
    del out
    os.sync()  # written back now, not during the timed commands (fsyncs would wait for it)


def clean_test(kind: str, dim: int = 64) -> np.ndarray:
    if kind == "curve":
        X = curve(np.linspace(0, 2 * np.pi, 1000, endpoint=False))
    else:
        X = sphere(np.random.default_rng(12345).standard_normal((2000, 3)))
    return X @ rotation(dim, X.shape[1])


def child_run(cmd: list[str], env=None) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run a command; its wall seconds and its own peak resident memory (MiB), read from
    GNU time's report where available, else from the largest child seen so far."""
    timer = ["/usr/bin/time", "-f", "PEAKKB %M"] if os.path.exists("/usr/bin/time") else []
    t0 = time.perf_counter()
    p = subprocess.run(timer + cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    for line in p.stderr.splitlines():
        if line.startswith("PEAKKB "):
            peak = int(line.split()[1]) / 1024
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    return p, wall, peak


def table(sizes: list[int], threads: int, device: str, work: Path) -> None:
    print(f"{'data':<8} {'n':>9} {'file MiB':>9} {'fit s':>7} {'peak MiB':>9} {'hard FVU':>9}")
    for kind in ("curve", "sphere"):
        test = work / f"test_{kind}.npy"
        np.save(test, clean_test(kind))
        times = []
        for n in sizes:
            path = work / f"{kind}_{n}.npy"
            write_data(path, kind, n)
            p, _, _ = child_run([sys.executable, "-c", CHILD, str(path), str(test), kind,
                                 str(threads), device])
            r = json.loads(p.stdout.strip().splitlines()[-1])
            times.append(r["fit_s"])
            print(f"{kind:<8} {n:>9} {path.stat().st_size / 2**20:>9.0f} {r['fit_s']:>7.1f} "
                  f"{r['peak_mib']:>9.0f} {r['fvu_hard']:>9.2e}", flush=True)
            path.unlink()
        ratios = " ".join(f"{t / times[0]:.2f}" for t in times)
        slope = np.polyfit(np.log(sizes), np.log(times), 1)[0] if len(sizes) > 1 else 0.0
        print(f"{kind}: fit time / fit time at n={sizes[0]}: {ratios}; "
              f"slope of log time on log n: {slope:.3f}", flush=True)


def big(threads: int, device: str, work: Path, n_big: int = 10**7) -> None:
    """`moeae train` on 10^7 x 64 against 10^4 x 64 of the same curve."""
    path = work / "big.npy"
    t0 = time.perf_counter()
    write_data(path, "curve", n_big)
    print(f"wrote {n_big} x 64 float32 ({path.stat().st_size / 2**30:.2f} GiB) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    small = work / "small.npy"
    np.save(small, np.load(path, mmap_mode="r")[:10_000])
    moeae = [sys.executable, "-m", "moeae.cli"]
    res = {}
    for name, data in (("10^4", small), (f"{n_big:.0e}", path)):
        run = work / f"run_{name}"
        _, wall, peak = child_run(moeae + ["train", "--data", str(data), "--experts", "4",
                                           "--latent-dim", "1", "--threads", str(threads),
                                           "--device", device, "--out", str(run), "--force"])
        test = work / "test.npy"
        np.save(test, clean_test("curve"))
        child_run(moeae + ["encode", str(run), str(test), str(work / "codes.npy")])
        child_run(moeae + ["decode", str(run), str(work / "codes.npy"), str(work / "rec.npy")])
        T, R = np.load(test), np.load(work / "rec.npy")
        fvu = float(((T - R) ** 2).sum(1).mean() / ((T - T.mean(0)) ** 2).sum(1).mean())
        res[name] = wall
        print(f"moeae train --data {name} x 64: {wall:.1f} s, peak RSS {peak:.0f} MiB, "
              f"hard FVU of a clean test curve {fvu:.2e}", flush=True)
    a, b = res.values()
    print(f"time ratio 10^7 / 10^4: {b / a:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10**3, 10**4, 10**5, 10**6])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--big", action="store_true", help="also the 10^7-point command line")
    ap.add_argument("--only-big", action="store_true", help="only the 10^7-point command line")
    args = ap.parse_args()
    import torch

    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} "
          f"thread(s), device {args.device}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        if not args.only_big:
            table(sorted(args.sizes), args.threads, args.device, work)
        if args.big or args.only_big:
            big(args.threads, args.device, work)


if __name__ == "__main__":
    main()
