"""How close a fit on noisy points comes to the clean curve, against smoothers that are told
each point's position along the curve.

    python benchmarks/noise_floor.py [--only NAME ...] [--seeds 3]

The noisy curves of ``hard_manifolds.py``: 1000 training points with Gaussian noise per
coordinate, a clean 1000-point grid to test on. The model (``n_experts="auto"``, default
settings) sees only the noisy points. The references are local polynomial smoothers (Gaussian
kernel; degree 1 and 3) of the noisy points *against their true curve parameter t*, which the
model has to find for itself; each one's bandwidth is the one of 20 with the least
leave-one-out error on the training points. A third reference, the cubic smoother told each
noisy point's *nearest* t (the parameter of the clean curve's point nearest to it, traced at
100000 parameters), is what a fit would reach that coded every point by projection onto the
true curve: the best codes a fit can find from the points alone, since a point pushed by its
noise across the figure-8's waist or towards another strand is nearer another part of the
curve than its own. All are scored alike: the squared distance of each clean grid point to
the fitted curve (traced at 10000 parameters, nearest trace point), over the grid's variance
(FVU). Printed per seed: the model's hard FVU, the three references', and the model's over
the cubic reference told the true t and over the one told the nearest t.

A reference that knows t is not a lower bound (a parametric fit that knew the curve's form
would do better still); it says how far from its noise a good smoother gets on these samples.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.spatial import cKDTree

from moeae import MoEAutoencoder
from moeae import datasets as ds

CASES = {  # as in hard_manifolds.py; all closed curves with t in [0, 2 pi)
    "figure8-noise-0.02": (ds.make_figure8, 0.02),
    "figure8-noise-0.05": (ds.make_figure8, 0.05),
    "trefoil-noise-0.05": (ds.make_trefoil, 0.05),
}
PERIOD = 2 * np.pi
BANDWIDTHS = np.geomspace(0.03, 1.5, 20)


def local_poly(t: np.ndarray, X: np.ndarray, tq: np.ndarray, h: float,
               degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Local polynomial fit of X (n, d) against the periodic t (n,), at tq (q,): the fitted
    points (q, d) and the smoother's weights (q, n)."""
    dt = (tq[:, None] - t[None] + PERIOD / 2) % PERIOD - PERIOD / 2  # (q, n)
    w = np.exp(-0.5 * (dt / h) ** 2)
    V = dt[..., None] ** np.arange(degree + 1)  # (q, n, p)
    A = np.einsum("qn,qni,qnj->qij", w, V, V)
    e0 = np.zeros((len(tq), degree + 1, 1))
    e0[:, 0] = 1.0
    row = np.linalg.solve(A, e0)[..., 0]  # (q, p): the intercept's row of A^-1
    L = w * np.einsum("qi,qni->qn", row, V)
    return L @ X, L


def reference_fvu(t, X, X_grid, degree: int) -> float:
    """The smoother's FVU on the clean grid, bandwidth by leave-one-out."""
    def loo(h):
        F, L = local_poly(t, X, t, h, degree)
        return (((X - F) / (1 - np.diag(L))[:, None]) ** 2).sum(1).mean()

    h = min(BANDWIDTHS, key=loo)
    tf = np.linspace(0, PERIOD, 10000, endpoint=False)
    trace = np.concatenate([local_poly(t, X, tf[i:i + 1000], h, degree)[0]
                            for i in range(0, len(tf), 1000)])
    d, _ = cKDTree(trace).query(X_grid)
    return float((d**2).mean() / ((X_grid - X_grid.mean(0)) ** 2).sum(1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, choices=list(CASES), metavar="NAME")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'case':20s} {'seed':>4s} {'model':>9s} {'linear*':>9s} {'cubic*':>9s} "
          f"{'cubic**':>9s} {'model/cubic*':>12s} {'model/cubic**':>13s}   (* told the true t, "
          f"** told the nearest t)")
    for name in args.only or CASES:
        make, noise = CASES[name]
        X_grid, _ = make(1000, grid=True)
        X_fine, t_fine = make(100000, grid=True)
        fine = cKDTree(X_fine)
        ratios, near_ratios = [], []
        for seed in range(args.seeds):
            X, t = make(1000, random_state=seed)
            X = X + noise * np.random.default_rng(seed + 1000).standard_normal(X.shape)
            est = MoEAutoencoder(n_experts="auto", random_state=seed).fit(X)
            model = est.reconstruction_error(X_grid, "hard")
            lin, cub = (reference_fvu(t, X, X_grid, p) for p in (1, 3))
            near = reference_fvu(t_fine[fine.query(X)[1]], X, X_grid, 3)
            ratios.append(model / cub)
            near_ratios.append(model / near)
            print(f"{name:20s} {seed:4d} {model:9.2e} {lin:9.2e} {cub:9.2e} {near:9.2e} "
                  f"{model / cub:12.1f} {model / near:13.1f}", flush=True)
        print(f"{name:20s} model/cubic* median {np.median(ratios):.1f}, worst "
              f"{max(ratios):.1f}; model/cubic** median {np.median(near_ratios):.1f}, worst "
              f"{max(near_ratios):.1f}", flush=True)


if __name__ == "__main__":
    main()
