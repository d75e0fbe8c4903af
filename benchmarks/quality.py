"""Quality and fit time of the default (``best``) recipe on held-out data.

    python benchmarks/quality.py [--only NAME ...] [--seeds 1] [--n-init N]

Each seed draws its own training sample. Per case: hard FVU, the mean and the worst (sup)
distance of a test point to its hard reconstruction, and, over the seeds, the share with hard
FVU <= 1e-4 and the worst FVU.

Curves are trained on 1000 random points and tested on 1000 new ones (the even grid where
there is one); surfaces on 2000 random points, tested on 2000 new ones; digits on the first
1400 images, tested on the other 397, against PCA on the same split.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.decomposition import PCA

from moeae import MoEAutoencoder
from moeae import datasets as ds


def fvu(X, X_hat):
    return float(((X - X_hat) ** 2).sum(1).mean() / ((X - X.mean(0)) ** 2).sum(1).mean())


def ellipse(n, random_state=None, grid=False, noise=0.0):
    rng = np.random.default_rng(random_state)
    t = np.linspace(0, 2 * np.pi, n) if grid else rng.uniform(0, 2 * np.pi, n)
    X = np.c_[3 * np.cos(t), np.sin(t)]
    return X + noise * rng.standard_normal(X.shape), t


def _embedded(make, dim, noise):
    """Train on noisy points of a curve placed in R^dim; test on the clean curve (the
    FVU then measures how well the manifold itself was recovered, not the noise)."""
    def gen(n, random_state=None, grid=False):
        X, t = make(n, random_state=random_state, grid=grid)
        Y = ds.embed(X, dim, random_state=0)  # the same placement for train and test
        if not grid:
            Y = Y + noise * np.random.default_rng(random_state).standard_normal(Y.shape)
        return Y, t
    return gen


circle_in_10d = _embedded(ds.make_circle, 10, 0.01)
trefoil_in_20d = _embedded(ds.make_trefoil, 20, 0.005)


def curve_case(make, E):
    def run(seed):
        X, _ = make(1000, random_state=seed)
        X_te, _ = make(1000, grid=True)
        return X, X_te, dict(n_experts=E, latent_dim=1)
    return run


def surface_case(make, E):
    def run(seed):
        X, _ = make(2000, random_state=seed)
        X_te, _ = make(2000, random_state=seed + 100)
        return X, X_te, dict(n_experts=E, latent_dim=2)
    return run


CASES = {
    "circle": curve_case(ds.make_circle, 2),
    "figure8": curve_case(ds.make_figure8, 2),
    "spiral": curve_case(ds.make_spiral, 4),
    "trefoil-3d": curve_case(ds.make_trefoil, 4),
    "ellipse": curve_case(ellipse, 4),
    "circle-in-10d": curve_case(circle_in_10d, 4),
    "trefoil-in-20d": curve_case(trefoil_in_20d, 4),
    "sphere": surface_case(ds.make_sphere, 4),
    "torus": surface_case(ds.make_torus, 8),
}


def digits(seed):
    X, _ = ds.load_digits()
    return X[:1400], X[1400:], dict(n_experts=8, latent_dim=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--n-init", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = args.only or [*CASES, "digits"]
    n_init = args.n_init if args.n_init == "auto" else int(args.n_init)
    print(f"{'case':16s} {'seed':>4s} {'fit s':>6s} {'fvu soft':>9s} {'fvu hard':>9s} "
          f"{'mean dist':>9s} {'sup dist':>9s}")
    for name in names:
        hards, secs = [], []
        for seed in range(args.seeds):
            X, X_te, kw = digits(seed) if name == "digits" else CASES[name](seed)
            t = time.perf_counter()
            est = MoEAutoencoder(random_state=seed, n_init=n_init, **kw).fit(X)
            sec = time.perf_counter() - t
            soft = est.reconstruction_error(X_te, "soft")
            hard = est.reconstruction_error(X_te, "hard")
            dist = np.linalg.norm(est.inverse_transform(est.transform(X_te)) - X_te, axis=1)
            hards.append(hard)
            secs.append(sec)
            extra = ""
            if name == "digits":
                pcs = [fvu(X_te, PCA(c).fit(X).inverse_transform(PCA(c).fit(X).transform(X_te)))
                       for c in (2, 4, 8)]
                extra = "  PCA 2/4/8: " + " / ".join(f"{p:.3f}" for p in pcs)
                extra += f"  train hard {est.reconstruction_error(X, 'hard'):.3f}"
            print(f"{name:16s} {seed:4d} {sec:6.1f} {soft:9.2e} {hard:9.2e} {dist.mean():9.2e} "
                  f"{dist.max():9.2e}{extra}", flush=True)
        if args.seeds > 1:
            ok = sum(h <= 1e-4 for h in hards)
            print(f"{name}: hard FVU <= 1e-4 on {ok} of {len(hards)} seeds, worst "
                  f"{max(hards):.2e}, mean fit {np.mean(secs):.1f} s", flush=True)


if __name__ == "__main__":
    main()
