"""Speed of the seed study (3 curves x 1, 2, 4, 8 experts, 5 epochs, batch 32, 1000 points).

Times, in one process and alternating between variants so machine noise hits all alike:

  (a) plain PyTorch: nn.Module experts in a Python loop, one model at a time (and (a1) the same
      on one thread, its fastest setting here, when --threads is 2 or more);
  (b) moeae's stacked experts, one model at a time;
  (c) moeae's population: all 12 models in one stacked program;
  (c2) the population as ``moeae reproduce`` trains it: two shards side by side in two
       processes of one thread each (only when --threads is 2 or more);

then (d) ``moeae reproduce`` as a whole command (import, training, metrics, figures) and its
peak memory (the sum of the proportional set size of the command and all its processes,
sampled every 50 ms), (e) ``--seeds 5`` against one seed, (f) steps/s of one model by expert
count. Prints seconds, steps/s, achieved GFLOP/s against this machine's measured fp32 matmul
peak, and ratios against (a).

    python benchmarks/bench_study.py [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

from moeae import datasets as ds
from moeae.config import recipe
from moeae.model import MoEAE
from moeae.training import Trainer

DATASETS = ("circle", "figure8", "spiral")
EXPERTS = (1, 2, 4, 8)
EPOCHS, BATCH, N = 5, 32, 1000


# -- (a) the plain way ------------------------------------------------------------------------
def mlp(d_in, d_out, width=100, depth=4, out=None):
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU(), nn.Dropout(0.1)]
        d = width
    layers += [nn.Linear(d, d_out)] + ([out] if out else []) + [nn.Dropout(0.1)]
    return nn.Sequential(*layers)


class PlainMoEAE(nn.Module):
    def __init__(self, E, d=2, k=1):
        super().__init__()
        self.router = mlp(d, E)
        self.enc = nn.ModuleList(mlp(d, k, out=nn.Tanh()) for _ in range(E))
        self.dec = nn.ModuleList(mlp(k, d) for _ in range(E))

    def forward(self, x):
        logits = self.router(x)
        p = torch.softmax(logits, -1)
        y = torch.stack([dec(enc(x)) for enc, dec in zip(self.enc, self.dec)], 1)  # (B, E, d)
        return (p[..., None] * y).sum(1), logits


def train_plain(X: torch.Tensor, E: int, seed: int) -> int:
    torch.manual_seed(seed)
    model = PlainMoEAE(E)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = 0
    for _ in range(EPOCHS):
        perm = torch.randperm(len(X))
        for i in range(0, len(X), BATCH):
            xb = X[perm[i:i + BATCH]]
            x_hat, logits = model(xb)
            loss = ((x_hat - xb) ** 2).mean() + (logits.mean(0) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    return steps


# -- (b), (c) moeae -----------------------------------------------------------------------------
def train_moeae(Xs: list[np.ndarray], counts: list[int], seeds: list[int]) -> int:
    mc, tc = recipe("seed")
    tr = Trainer(MoEAE(mc, counts), tc, seeds)
    X = torch.tensor(np.stack(Xs), dtype=torch.float32)
    tr.initialize(X)
    tr.fit(X, EPOCHS)
    return tr.state.step


def train_sharded(Xs: list[np.ndarray], counts: list[int], seeds: list[int], shards: int
                  ) -> int:
    """As ``moeae reproduce`` trains: the models split into balanced shards, one forked
    process of one thread per shard."""
    from moeae.study import _balance, _model_cost
    from moeae.workers import fork_map

    groups = _balance([_model_cost(E) for E in counts], shards)
    jobs = [([Xs[i] for i in g], [counts[i] for i in g], [seeds[i] for i in g]) for g in groups]
    # one thread here before forking, as the study does: children must not inherit a pool
    return one_thread(lambda: sum(fork_map(_train_group, jobs)))


def _train_group(job) -> int:
    torch.set_num_threads(1)
    return train_moeae(*job)


def one_thread(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def step_flops(E: int, d=2, k=1, width=100, depth=4, batch=BATCH) -> float:
    """Matmul FLOPs of one training step (forward x 3 for backward) of one model."""
    def mlp_macs(a, b):
        sizes = [a] + [width] * depth + [b]
        return sum(x * y for x, y in zip(sizes[:-1], sizes[1:]))
    return 3 * 2 * batch * (mlp_macs(d, E) + E * (mlp_macs(d, k) + mlp_macs(k, d)))


def peak_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9


def timed(fn):
    t = time.perf_counter()
    steps = fn()
    return time.perf_counter() - t, steps


def _tree_pss_kib(root: int) -> int:
    """Proportional set size (KiB) of process ``root`` and all its descendants (Linux):
    pages shared by forked processes are counted once in total, not once per process."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except OSError:
            pass
    return total


def run_cli(args: list[str], memory: bool = False) -> tuple[float, float]:
    """Wall seconds of a whole ``moeae`` command in a fresh process and, with ``memory``, its
    peak memory (MiB: the largest sum of PSS over its process tree, sampled every 50 ms; the
    sampling takes CPU, so such a run's seconds are not comparable)."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "moeae.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    if memory and os.path.exists("/proc/self/smaps_rollup"):
        while proc.poll() is None:
            peak = max(peak, _tree_pss_kib(proc.pid))
            time.sleep(0.05)
    proc.wait()
    sec = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"moeae {' '.join(args)} failed: {proc.stderr.read()}")
    return sec, peak / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds (default: 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.optim.Adam([nn.Parameter(torch.zeros(1))])  # pay Adam's one-time import up front

    data = {n: ds.get_dataset(n).make(N, random_state=42)[0] for n in DATASETS}
    configs = [(n, E) for n in DATASETS for E in EXPERTS]
    flops = sum(step_flops(E) for _, E in configs) * EPOCHS * -(-N // BATCH)
    peak = peak_gflops()
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s);"
          f" fp32 matmul peak {peak:.0f} GFLOP/s; study = {flops / 1e9:.1f} GFLOP")

    variants = {
        "a plain loop, one model at a time": lambda: sum(
            train_plain(torch.tensor(data[n], dtype=torch.float32), E, 0) for n, E in configs),
        "b stacked experts, one at a time": lambda: sum(
            train_moeae([data[n]], [E], [0]) for n, E in configs),
        "c population, 12 models at once": lambda: train_moeae(
            [data[n] for n, _ in configs], [E for _, E in configs], [0] * len(configs)),
    }
    if args.threads > 1:
        variants["a1 plain loop on 1 thread (its best)"] = lambda: one_thread(
            variants["a plain loop, one model at a time"])
        variants[f"c2 population, {args.threads} processes"] = lambda: train_sharded(
            [data[n] for n, _ in configs], [E for _, E in configs], [0] * len(configs),
            args.threads)
    times: dict[str, list[float]] = {k: [] for k in variants}
    steps: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            sec, st = timed(fn)
            times[name].append(sec)
            steps[name] = st
    base = min(times["a plain loop, one model at a time"])
    best_plain = min(min(v) for k, v in times.items() if k.startswith("a"))
    print(f"\n{'training only':36s} {'best s':>7s} {'median s':>8s} {'prog/s':>8s} "
          f"{'GFLOP/s':>8s} {'% peak':>6s} {'speedup':>7s}")
    for name, ts in times.items():
        best = min(ts)
        gf = flops / best / 1e9
        print(f"{name:36s} {best:7.2f} {np.median(ts):8.2f} {steps[name] / best:8.0f} "
              f"{gf:8.1f} {100 * gf / peak:6.1f} {base / best:7.2f}x")

    # (d) the whole command, (e) seeds
    with tempfile.TemporaryDirectory() as tmp:
        whole, seeds5 = [], []
        for _ in range(args.repeats):
            whole.append(run_cli(["reproduce", "--out", f"{tmp}/r1",
                                  "--threads", str(args.threads)]))
            seeds5.append(run_cli(["reproduce", "--out", f"{tmp}/r5", "--seeds", "5",
                                   "--no-figures", "--threads", str(args.threads)]))
        nofig = [run_cli(["reproduce", "--out", f"{tmp}/r0", "--no-figures",
                          "--threads", str(args.threads)]) for _ in range(args.repeats)]
        _, mem = run_cli(["reproduce", "--out", f"{tmp}/rm", "--threads", str(args.threads)],
                         memory=True)
    w = min(s for s, _ in whole)
    print(f"\nmoeae reproduce (whole command, figures and metrics): {w:.2f} s (median "
          f"{np.median([s for s, _ in whole]):.2f}), peak memory "
          f"{mem:.0f} MiB (PSS, all its processes); {base / w:.2f}x plain-PyTorch training alone "
          f"({best_plain / w:.2f}x its best thread count); "
          f"{93.0 / w:.1f}x the reference's 93 s (measured on the reference code)")
    s5, s1 = min(s for s, _ in seeds5), min(s for s, _ in nofig)
    print(f"reproduce --seeds 5 (no figures): {s5:.2f} s vs 1 seed {s1:.2f} s: ratio "
          f"{s5 / s1:.2f}")

    # (f) steps/s of one model (stacked) by expert count
    print("\nsteps/s of one model by expert count (stacked experts; plain loop):")
    X = data["circle"]
    for E in EXPERTS:
        sb, nb = timed(lambda E=E: train_moeae([X], [E], [0]))
        sa, na = timed(lambda E=E: train_plain(torch.tensor(X, dtype=torch.float32), E, 0))
        print(f"  {E} experts: {nb / sb:6.0f} steps/s stacked, {na / sa:6.0f} plain")


if __name__ == "__main__":
    main()
