"""What a new user might hand ``n_experts="auto"``: sizes, scales, types and embeddings.

    python benchmarks/new_user.py [--only NAME ...]

Each case trains ``MoEAutoencoder(n_experts="auto", random_state=0)`` at default settings
(one torch thread) and prints the charts it kept, the fit time (the choice of charts
included), the hard FVU on the training points and on new points (a curve's even grid where
there is one, else a fresh sample; noisy data are tested on clean points), and any Python
warning the fit raised. ``standard`` cases are the seven data sets whose chart count the
results page reports; the others change one thing a user might: the number of points, the
units, float32, uneven sampling, repeated points, two separate pieces, flat pieces, and
curves and surfaces placed in 10-100 dimensions by a random rotation.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from moeae import MoEAutoencoder
from moeae import datasets as ds


def rotated(X, dim, seed=0):
    """X placed in R^dim by a random rotation (distances kept)."""
    Q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return np.pad(X, ((0, 0), (0, dim - X.shape[1]))) @ Q


def circle(n, seed):
    return ds.make_circle(n, random_state=seed)[0]


def uneven_circle(n, seed):
    """Ten times as many points on one half as on the other."""
    rng = np.random.default_rng(seed)
    dense = round(n * 10 / 11)
    t = np.r_[rng.uniform(0, np.pi, dense), rng.uniform(np.pi, 2 * np.pi, n - dense)]
    return np.c_[np.cos(t), np.sin(t)]


def segment(n, seed):
    s = np.random.default_rng(seed).uniform(size=n)
    return np.c_[s, 2 * s]


def square(n, seed):
    return np.c_[np.random.default_rng(seed).uniform(size=(n, 2)), np.zeros(n)]


def two_circles(n, seed):
    return np.r_[circle(n // 2, seed), circle(n - n // 2, seed + 1) + [5.0, 0.0]]


def noisy_trefoil_50d(n, seed):
    X = rotated(ds.make_trefoil(n, random_state=seed)[0], 50)
    return X + 0.01 * np.random.default_rng(seed).normal(size=X.shape)


GRID = {"figure8": lambda: ds.make_figure8(1000, grid=True)[0],
        "trefoil-50d": lambda: rotated(ds.make_trefoil(1000, grid=True)[0], 50)}

CASES = {  # name: (training points, test points, latent_dim)
    # standard: what the automatic count picks on the data sets the results page reports
    "circle": (lambda: circle(1000, 0), lambda: circle(1000, 99), 1),
    "figure8": (lambda: ds.make_figure8(1000, random_state=0)[0], GRID["figure8"], 1),
    "spiral": (lambda: ds.make_spiral(1000, random_state=0)[0],
               lambda: ds.make_spiral(1000, grid=True)[0], 1),
    "sphere": (lambda: ds.make_sphere(2000, random_state=0)[0],
               lambda: ds.make_sphere(2000, random_state=99)[0], 2),
    "torus": (lambda: ds.make_torus(2000, random_state=0)[0],
              lambda: ds.make_torus(2000, random_state=99)[0], 2),
    "swiss-roll": (lambda: ds.make_swiss_roll(2000, random_state=0)[0],
                   lambda: ds.make_swiss_roll(2000, random_state=99)[0], 2),
    "digits": (lambda: ds.load_digits()[0], lambda: ds.load_digits()[0], 2),
    # one thing changed
    "circle-50": (lambda: circle(50, 1), lambda: circle(1000, 99), 1),
    "circle-200": (lambda: circle(200, 1), lambda: circle(1000, 99), 1),
    "circle-5000": (lambda: circle(5000, 1), lambda: circle(1000, 99), 1),
    "circle-x1e4+1e3": (lambda: circle(1000, 1) * 1e4 + 1e3,
                        lambda: circle(1000, 99) * 1e4 + 1e3, 1),
    "circle-x1e-4": (lambda: circle(1000, 1) * 1e-4, lambda: circle(1000, 99) * 1e-4, 1),
    "circle-float32": (lambda: circle(1000, 1).astype(np.float32), lambda: circle(1000, 99), 1),
    "circle-uneven": (lambda: uneven_circle(1000, 1), lambda: circle(1000, 99), 1),
    "figure8-twice": (lambda: np.repeat(ds.make_figure8(1000, random_state=1)[0], 2, 0),
                      GRID["figure8"], 1),
    "two-circles": (lambda: two_circles(1000, 1), lambda: two_circles(1000, 98), 1),
    "segment": (lambda: segment(1000, 1), lambda: segment(500, 99), 1),
    "square": (lambda: square(2000, 1), lambda: square(2000, 99), 2),
    "sphere-10d": (lambda: rotated(ds.make_sphere(2000, random_state=1)[0], 10),
                   lambda: rotated(ds.make_sphere(2000, random_state=9)[0], 10), 2),
    "helix-100d": (lambda: rotated(ds.make_helix(1000, random_state=1)[0], 100),
                   lambda: rotated(ds.make_helix(1000, random_state=9)[0], 100), 1),
    "trefoil-50d-noisy": (lambda: noisy_trefoil_50d(1000, 1), GRID["trefoil-50d"], 1),
    # a limit: random gaps along the coil reach about its turns' distance (0.3)
    "helix-300": (lambda: ds.make_helix(300, random_state=1)[0],
                  lambda: ds.make_helix(1000, random_state=9)[0], 1),
    "helix-300-pitch-1": (lambda: ds.make_helix(300, pitch=1.0, random_state=1)[0],
                          lambda: ds.make_helix(1000, pitch=1.0, random_state=9)[0], 1),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None, choices=list(CASES), metavar="NAME")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'case':18s} {'charts':>6s} {'fit s':>6s} {'train FVU':>9s} {'new FVU':>9s}  warnings")
    for name in args.only or CASES:
        make, make_test, k = CASES[name]
        X, X_te = make(), np.asarray(make_test(), dtype=np.float64)
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            est = MoEAutoencoder(n_experts="auto", latent_dim=k, random_state=0).fit(X)
        sec = time.perf_counter() - t
        train = est.reconstruction_error(np.asarray(X, dtype=np.float64), "hard")
        print(f"{name:18s} {est.n_charts_:6d} {sec:6.1f} {train:9.2e} "
              f"{est.reconstruction_error(X_te, 'hard'):9.2e}  "
              + "; ".join(str(w.message) for w in seen), flush=True)


if __name__ == "__main__":
    main()
