"""Curves and surfaces never used while tuning the recipe, at default settings with
``n_experts="auto"``.

    python benchmarks/never_tuned.py [--only NAME ...] [--seeds 1] [--surfaces]

Cusps (cardioid, astroid, deltoid, nephroid, an epicycloid), branches crossing at one point
(roses with 3 and 4 petals), several crossings (the trefoil's outline), smooth closed
curves of uneven curvature (the lemniscate of Bernoulli, a superellipse), and in space a (3, 5)
torus knot, Viviani's curve and a wiggly circle turned into 50-D. Each seed draws 1000
training points uniformly in the curve's parameter and is tested on the even 1000-point grid
(one torch thread). Printed per fit: charts in use, fit time (the choice of charts included),
hard FVU, and the worst test point's distance from its hard reconstruction, in data units and
beside the curve's RMS radius.

``--surfaces``: instead, surfaces (an ellipsoid 3:2:1, a saddle, a hemisphere, a Gaussian bump,
the Clifford torus in 4-D, a cylinder, a cone without its apex, a paraboloid, a sphere turned
into 10-D), each fitted on 2000 points drawn from the seed and tested on 2000
new ones; printed: charts, fit time, hard FVU, the mean and worst test point's distance from its
hard reconstruction over the surface's RMS radius, and ``orientable()`` for the closed ones.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from moeae import MoEAutoencoder


def _polar(r):
    return lambda t: np.c_[r(t) * np.cos(t), r(t) * np.sin(t)]


def _rotated(X, D, seed=42):
    """X (n, k) padded with zeros to D columns and turned by a fixed random rotation."""
    Q = np.linalg.qr(np.random.default_rng(seed).standard_normal((D, D)))[0]
    return np.c_[X, np.zeros((len(X), D - X.shape[1]))] @ Q


def _superellipse(t, p=4.0):
    c, s = np.cos(t), np.sin(t)
    return np.c_[np.sign(c) * np.abs(c) ** (2 / p), np.sign(s) * np.abs(s) ** (2 / p)]


CURVES = {  # name: (x(t) for t of shape (n,) -> (n, D), the parameter's period)
    "cardioid": (_polar(lambda t: 1 - np.cos(t)), 2 * np.pi),  # 1 cusp
    "astroid": (lambda t: np.c_[np.cos(t) ** 3, np.sin(t) ** 3], 2 * np.pi),  # 4 cusps
    "deltoid": (lambda t: np.c_[2 * np.cos(t) + np.cos(2 * t),
                                2 * np.sin(t) - np.sin(2 * t)], 2 * np.pi),  # 3 cusps
    "nephroid": (lambda t: np.c_[3 * np.cos(t) - np.cos(3 * t),
                                 3 * np.sin(t) - np.sin(3 * t)], 2 * np.pi),  # 2 cusps
    "epicycloid": (lambda t: np.c_[4 * np.cos(t) - np.cos(4 * t),
                                   4 * np.sin(t) - np.sin(4 * t)], 2 * np.pi),  # 3 cusps
    "rose-3": (_polar(lambda t: np.cos(3 * t)), np.pi),  # 3 petals through the centre
    "rose-4": (_polar(lambda t: np.cos(2 * t)), 2 * np.pi),  # 4 petals
    "trefoil-outline": (lambda t: np.c_[np.sin(t) + 2 * np.sin(2 * t),
                                        np.cos(t) - 2 * np.cos(2 * t)], 2 * np.pi),
    "lemniscate": (lambda t: np.c_[np.cos(t), np.sin(t) * np.cos(t)]
                   / (1 + np.sin(t) ** 2)[:, None], 2 * np.pi),
    "superellipse": (_superellipse, 2 * np.pi),  # |x|^4 + |y|^4 = 1
    # in space
    "torus-knot-3-5": (lambda t: np.c_[(2 + np.cos(5 * t)) * np.cos(3 * t),
                                       (2 + np.cos(5 * t)) * np.sin(3 * t), -np.sin(5 * t)],
                       2 * np.pi),
    "viviani": (lambda t: np.c_[1 + np.cos(t), np.sin(t), 2 * np.sin(t / 2)], 4 * np.pi),
    "wiggly-circle-50d": (lambda t: _rotated(np.c_[np.cos(t), np.sin(t), 0.3 * np.cos(3 * t),
                                                   0.3 * np.sin(5 * t)], 50), 2 * np.pi),
}


def _ellipsoid(rng, n):
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True) * [3.0, 2.0, 1.0]


def _square(f):  # a graph z = f(u, v) over the square [-1, 1]^2
    def draw(rng, n):
        u, v = rng.uniform(-1, 1, (2, n))
        return np.c_[u, v, f(u, v)]
    return draw


def _hemisphere(rng, n):
    v = rng.standard_normal((n, 3))
    v[:, 2] = np.abs(v[:, 2])
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _clifford(rng, n):
    a, b = rng.uniform(0, 2 * np.pi, (2, n))
    return np.c_[np.cos(a), np.sin(a), np.cos(b), np.sin(b)] / np.sqrt(2)


def _cylinder(rng, n):
    a, h = rng.uniform(0, 2 * np.pi, n), rng.uniform(-1, 1, n)
    return np.c_[np.cos(a), np.sin(a), h]


def _cone(rng, n):  # its apex cut away: radius 0.3 to 1, uniform in area
    a, r = rng.uniform(0, 2 * np.pi, n), np.sqrt(rng.uniform(0.09, 1, n))
    return np.c_[r * np.cos(a), r * np.sin(a), r]


def _sphere_10d(rng, n):
    v = rng.standard_normal((n, 3))
    return _rotated(v / np.linalg.norm(v, axis=1, keepdims=True), 10, seed=7)


SURFACES = {  # name: (draw(rng, n) -> (n, D), closed)
    "ellipsoid": (_ellipsoid, True),
    "saddle": (_square(lambda u, v: u**2 - v**2), False),
    "hemisphere": (_hemisphere, False),
    "gaussian-bump": (_square(lambda u, v: np.exp(-2 * (u**2 + v**2))), False),
    "clifford-torus": (_clifford, True),  # flat torus in 4-D
    "cylinder": (_cylinder, False),
    "cone": (_cone, False),
    "paraboloid": (_square(lambda u, v: u**2 + v**2), False),
    "sphere-10d": (_sphere_10d, True),
}


def surfaces(names, seeds: int) -> None:
    print(f"{'surface':16s} {'seed':>4s} {'charts':>6s} {'fit s':>6s} {'hard FVU':>9s} "
          f"{'mean dist':>9s} {'worst dist':>10s} {'orientable':>10s}   (distances over the "
          f"RMS radius)")
    for name in names:
        draw, closed = SURFACES[name]
        for seed in range(seeds):
            X = draw(np.random.default_rng(seed), 2000)
            X_te = draw(np.random.default_rng(seed + 100), 2000)
            radius = float(np.sqrt(((X_te - X_te.mean(0)) ** 2).sum(1).mean()))
            t = time.perf_counter()
            est = MoEAutoencoder(n_experts="auto", latent_dim=2, random_state=seed).fit(X)
            sec = time.perf_counter() - t
            dist = np.linalg.norm(est.inverse_transform(est.transform(X_te)) - X_te, axis=1)
            orient = str(est.orientable()) if closed else ""
            print(f"{name:16s} {seed:4d} {est.n_charts_:6d} {sec:6.1f} "
                  f"{est.reconstruction_error(X_te, 'hard'):9.2e} {dist.mean() / radius:9.1e} "
                  f"{dist.max() / radius:10.1e} {orient:>10s}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None, choices=list(CURVES) + list(SURFACES),
                    metavar="NAME")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--surfaces", action="store_true", help="the surfaces instead of curves")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.surfaces:
        surfaces([n for n in args.only or SURFACES if n in SURFACES], args.seeds)
        return
    print(f"{'curve':16s} {'seed':>4s} {'charts':>6s} {'fit s':>6s} {'hard FVU':>9s} "
          f"{'worst dist':>10s} {'RMS radius':>10s}")
    for name in [n for n in args.only or CURVES if n in CURVES]:
        x, period = CURVES[name]
        X_te = x(np.linspace(0, period, 1000, endpoint=False))
        radius = float(np.sqrt(((X_te - X_te.mean(0)) ** 2).sum(1).mean()))
        for seed in range(args.seeds):
            X = x(np.random.default_rng(seed).uniform(0, period, 1000))
            t = time.perf_counter()
            est = MoEAutoencoder(n_experts="auto", random_state=seed).fit(X)
            sec = time.perf_counter() - t
            worst = np.linalg.norm(est.inverse_transform(est.transform(X_te)) - X_te, axis=1).max()
            print(f"{name:16s} {seed:4d} {est.n_charts_:6d} {sec:6.1f} "
                  f"{est.reconstruction_error(X_te, 'hard'):9.2e} {worst:10.3f} {radius:10.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
