"""Constrained charts: what the isometry constraint costs and buys, orientability, sampling.

    python benchmarks/bench_constraints.py [--part curves swiss orient sphere sample] [--seeds 5]

- ``curves``: circle (2 charts), figure-8 (2), spiral (4), 1000 training points, tested on the
  1000-point grid; fit time, time to encode the grid, hard FVU, the worst point's distance and
  the worst chart's speed CV, without and with ``isometric=True`` (arc-length charts), fitted
  alternately (so a busy machine slows both alike).
- ``swiss``: swiss roll, 2000 points, 4 charts, latent 2; the same, with the spread (p95/p5)
  of the per-chart-normalised neighbour distance ratio in the unrolled coordinates.
- ``orient``: ``orientable()`` on a Moebius band, a band with two half twists, a cylinder, a
  sphere and a torus (2000 points, 4 charts), over ``--seeds`` seeds.
- ``sphere``: distortion (the same ratio spread with great-circle distances) against the number
  of charts, 2, 4, 8, without and with the constraint.
- ``sample``: Kolmogorov-Smirnov D of 4000 ``sample()`` points: the circle's angle, the swiss
  roll's arc length and height.

Every fit uses one torch thread; the output is one line per fit and a JSON summary at the end.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.stats import kstest

from moeae import MoEAutoencoder
from moeae import datasets as ds
from moeae.geometry import distance_ratio_spread, great_circle, speed_cv, swiss_roll_arclength

FIGURES = None  # --figures DIR: z against arc length (curves), chart graphs (orient)

CURVES = {"circle": (ds.make_circle, 2, True), "figure8": (ds.make_figure8, 2, True),
          "spiral": (ds.make_spiral, 4, False)}


def fit(X, iso, seed, **kw):
    t0 = time.perf_counter()
    est = MoEAutoencoder(random_state=seed, isometric=iso, **kw).fit(X)
    return est, time.perf_counter() - t0


def codes_of(est, X):
    c = est.transform(X)
    return c[:, 0].astype(int), c[:, 1:]


def part_curves(seeds, rows):
    for name, (make, E, closed) in CURVES.items():
        Xt, tt = make(1000, grid=True)
        for seed in range(seeds):
            X, _ = make(1000, random_state=seed)
            for iso in ((False, True) if seed % 2 == 0 else (True, False)):
                est, sec = fit(X, iso, seed, n_experts=E, latent_dim=1)
                t0 = time.perf_counter()
                chart, z = codes_of(est, Xt)
                encode_s = time.perf_counter() - t0
                worst = float(np.linalg.norm(
                    est.inverse_transform(np.c_[chart, z]) - Xt, axis=1).max())
                cv = speed_cv(chart, z, Xt, tt, closed)
                if FIGURES and seed == 0:
                    from moeae.plot_geometry import plot_arclength
                    from moeae.run import as_population
                    from moeae.training import evaluate

                    ev = evaluate(est.model_, as_population(Xt, est.model_.shift.dtype))
                    snap = {k: v[0] for k, v in ev.items()} | {"t": tt}
                    plot_arclength({f"{name}, isometric={iso}": snap},
                                   f"{FIGURES}/arclength_{name}_{'iso' if iso else 'plain'}.png")
                row = {"part": "curves", "data": name, "seed": seed, "isometric": iso,
                       "fit_s": sec, "encode_s": encode_s, "worst": worst,
                       "fvu_hard": est.reconstruction_error(Xt),
                       "speed_cv_max": max(cv.values()), "speed_cv": cv}
                report(row, rows)


def swiss_flat(X, t):
    return np.c_[swiss_roll_arclength(t[:, 0]), t[:, 1]]


def part_swiss(seeds, rows):
    Xt, tt = ds.make_swiss_roll(2000, random_state=10_000)
    for seed in range(seeds):
        X, _ = ds.make_swiss_roll(2000, random_state=seed)
        for iso in ((False, True) if seed % 2 == 0 else (True, False)):
            est, sec = fit(X, iso, seed, n_experts=4, latent_dim=2)
            chart, z = codes_of(est, Xt)
            row = {"part": "swiss", "data": "swiss_roll", "seed": seed, "isometric": iso,
                   "fit_s": sec, "fvu_hard": est.reconstruction_error(Xt),
                   "ratio_p95_p5": distance_ratio_spread(chart, z, swiss_flat(Xt, tt))}
            report(row, rows)


SURFACES = {
    "moebius": lambda n, s: ds.make_moebius(n, half_twists=1, random_state=s),
    "band_2_twists": lambda n, s: ds.make_moebius(n, half_twists=2, random_state=s),
    "cylinder": lambda n, s: ds.make_cylinder(n, random_state=s),
    "sphere": lambda n, s: ds.make_sphere(n, random_state=s),
    "torus": lambda n, s: ds.make_torus(n, random_state=s),
}


# charts per surface: 4, the torus 8 as in benchmarks/quality.py (with 4, each chart is a band
# around the tube, a loop its chart folds: FVU 2e-4 to 4e-4 and mixed transition signs)
CHARTS = {"torus": 8}


def part_orient(seeds, rows, iso=None, only=None, first_seed=0):
    for name, make in SURFACES.items():
        if only and name not in only:
            continue
        E = CHARTS.get(name, 4)
        for seed in range(first_seed, seeds):
            X, _ = make(2000, seed)
            est, sec = fit(X, iso, seed, n_experts=E, latent_dim=2)
            tr = est.transitions()
            if FIGURES and seed == 0:
                from moeae.plot_geometry import plot_chart_graph

                plot_chart_graph(tr, E, f"{FIGURES}/graph_{name}.png", title=name)
            row = {"part": "orient", "data": name, "n_experts": E, "seed": seed,
                   "isometric": iso,
                   "fit_s": sec, "fvu_hard": est.reconstruction_error(X),
                   "orientable": est.orientable(), "pieces": len(tr),
                   "reversing": sum(t.sign < 0 for t in tr),
                   "edges": sorted({(t.source, t.target, t.sign) for t in tr})}
            report(row, rows)


def part_sphere(seeds, rows):
    Xt, _ = ds.make_sphere(2000, random_state=10_000)
    for E in (2, 4, 8):
        for seed in range(seeds):
            X, _ = ds.make_sphere(2000, random_state=seed)
            for iso in (False, True):
                est, sec = fit(X, iso, seed, n_experts=E, latent_dim=2)
                chart, z = codes_of(est, Xt)
                row = {"part": "sphere", "data": "sphere", "n_experts": E, "seed": seed,
                       "isometric": iso, "fit_s": sec, "fvu_hard": est.reconstruction_error(Xt),
                       "ratio_p95_p5": distance_ratio_spread(chart, z, Xt, metric=great_circle)}
                report(row, rows)


def part_sample(seeds, rows, iso=True):
    for seed in range(seeds):
        X, _ = ds.make_circle(1000, random_state=seed)
        est, _ = fit(X, iso, seed, n_experts=2, latent_dim=1)
        S = est.sample(4000, random_state=seed)
        angle = np.arctan2(S[:, 1], S[:, 0]) % (2 * np.pi)
        report({"part": "sample", "data": "circle", "seed": seed, "isometric": iso,
                "ks_angle": kstest(angle / (2 * np.pi), "uniform").statistic}, rows)
        X, _ = ds.make_swiss_roll(2000, random_state=seed)
        est, _ = fit(X, iso, seed, n_experts=4, latent_dim=2)
        S = est.sample(4000, random_state=seed)
        s = swiss_roll_arclength(np.hypot(S[:, 0], S[:, 2]))
        lo, hi = swiss_roll_arclength(1.5 * np.pi), swiss_roll_arclength(4.5 * np.pi)
        report({"part": "sample", "data": "swiss_roll", "seed": seed, "isometric": iso,
                "ks_arclength": kstest((s - lo) / (hi - lo), "uniform").statistic,
                "ks_height": kstest(S[:, 1] / 21.0, "uniform").statistic}, rows)


def report(row, rows):
    rows.append(row)
    print(json.dumps(row, default=str), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", nargs="+", default=["curves", "swiss", "orient", "sphere",
                                                 "sample"])
    p.add_argument("--seeds", type=int, default=1, help="seeds per case (default: 1; orient "
                   "uses max(5, seeds))")
    p.add_argument("--surfaces", nargs="+", default=None, choices=list(SURFACES),
                   help="orient: only these surfaces (default: all)")
    p.add_argument("--first-seed", type=int, default=0, help="orient: first seed (default: 0)")
    p.add_argument("--sample-isometric", action="store_true",
                   help="fit the sample part's models with isometric=True (default: off)")
    p.add_argument("--figures", default=None, help="folder for figures (default: none)")
    args = p.parse_args()
    global FIGURES
    FIGURES = args.figures
    if FIGURES:
        import os

        os.makedirs(FIGURES, exist_ok=True)
    torch.set_num_threads(1)
    rows: list[dict] = []
    for part in args.part:
        if part == "orient":
            part_orient(max(5, args.seeds), rows, only=args.surfaces,
                        first_seed=args.first_seed)
        elif part == "sample":
            part_sample(args.seeds, rows, iso=args.sample_isometric)
        else:
            {"curves": part_curves, "swiss": part_swiss, "sphere": part_sphere}[part](
                args.seeds, rows)
    for part in args.part:  # fit-time cost of the constraint, paired by case and seed
        pairs = {}
        for r in rows:
            if r["part"] == part and "fit_s" in r and r.get("isometric") in (True, False):
                key = (r["data"], r.get("n_experts"), r["seed"])
                pairs.setdefault(key, {})[r["isometric"]] = r["fit_s"]
        ratios = [v[True] / v[False] for v in pairs.values() if len(v) == 2]
        if ratios:
            print(f"{part}: fit time with / without the constraint: median "
                  f"{np.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}, "
                  f"{len(ratios)} pairs)")


if __name__ == "__main__":
    main()
