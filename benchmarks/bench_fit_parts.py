"""What a default fit spends its time on, and a measured saving, in one run.

    python benchmarks/bench_fit_parts.py [--repeats 5]

1. The starting charts' coordinates on four 870-900-point pieces of a sphere: landmark MDS
   (``atlas.landmark_embedding``, 200 landmarks) against all-pairs shortest paths
   (``atlas.geodesic_embedding``): seconds and the ratio, the two alternated so the ratio
   holds when the machine's speed drifts.
2. ``n_experts="auto"``'s choice and the starting atlas on one 2000-point sphere, sharing a
   cache as a fit does: the atlas reusing the pieces the choice checked, against the same with
   those pieces and fold ratios dropped from the cache in between (made twice, as before
   session 14); alternated, seconds and the ratio.
3. Whole default fits (one thread; 1000-point curves, 2000-point surfaces), seed 1: seconds
   and hard FVU on held-out points, with the starting atlas's share.

Times are wall clock on whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def sphere_pieces(n: int = 2000) -> list[tuple[object, np.ndarray]]:
    from moeae import datasets as ds
    from moeae.graph import neighbour_graph

    X, _ = ds.make_sphere(n, random_state=0)
    pieces = []
    for axis in range(3):
        for sign in (1, -1):
            P = X[sign * X[:, axis] > 0.1][:900]
            pieces.append((neighbour_graph(P, 10, 2)[0], P))
    return pieces[:4]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from moeae import MoEAutoencoder
    from moeae import datasets as ds
    from moeae.atlas import geodesic_embedding, landmark_embedding

    pieces = sphere_pieces()
    lm, ap_ = [], []
    for _ in range(args.repeats):
        for fn, out in ((lambda g, P: landmark_embedding(g, P, 3), lm),
                        (lambda g, P: geodesic_embedding(g, 3), ap_)):
            t = time.perf_counter()
            for g, P in pieces:
                fn(g, P)
            out.append(time.perf_counter() - t)
    a, b = np.median(lm), np.median(ap_)
    sizes = "/".join(str(len(P)) for _, P in pieces)
    print(f"chart coordinates, sphere pieces of {sizes} points: landmarks {a:.3f} s, "
          f"all pairs {b:.3f} s: ratio {a / b:.2f}")

    from moeae.atlas import auto_charts, initial_atlas

    X, _ = ds.make_sphere(2000, random_state=1)
    X32 = X.astype(np.float32)  # as the trainer hands its points to the atlas
    reuse, again = [], []
    for _ in range(args.repeats):
        for drop, out in ((False, reuse), (True, again)):
            cache: dict = {}
            t = time.perf_counter()
            c, _ = auto_charts(X, 2, 0, cache=cache)
            if drop:
                for key in [k for k in cache if k[0] in ("centres", "folds")]:
                    del cache[key]
            initial_atlas(X32, c, 2, 0, overlap=0.3, coordinates=True, cache=cache)
            out.append(time.perf_counter() - t)
    a, b = np.median(reuse), np.median(again)
    print(f"chart choice + starting atlas, sphere of 2000 points ({c} charts): pieces reused "
          f"{a:.2f} s, made again {b:.2f} s: ratio {a / b:.2f}")

    import moeae.training as training

    print("\n| data | charts | fit s | atlas s | hard FVU |\n|---|---|---|---|---|")
    MoEAutoencoder(n_experts=2, epochs=1, random_state=0).fit(
        ds.make_circle(200, random_state=0)[0])  # imports and first-call costs
    for name, E, k, n in [("circle", 2, 1, 1000), ("figure8", 2, 1, 1000), ("spiral", 4, 1, 1000),
                          ("sphere", 4, 2, 2000), ("swiss_roll", 4, 2, 2000)]:
        make = getattr(ds, f"make_{name}")
        X, _ = make(n, random_state=1)
        Xt = make(1000, grid=True)[0] if k == 1 else make(n, random_state=101)[0]
        spent = []
        inner = training.initial_atlas

        def timed(*a, _inner=inner, _spent=spent, **kw):
            t = time.perf_counter()
            try:
                return _inner(*a, **kw)
            finally:
                _spent.append(time.perf_counter() - t)
        training.initial_atlas = timed  # the trainer's own reference: timed, then restored
        try:
            t = time.perf_counter()
            est = MoEAutoencoder(n_experts=E, latent_dim=k, random_state=1).fit(X)
            fit = time.perf_counter() - t
        finally:
            training.initial_atlas = inner
        print(f"| {name} | {E} | {fit:.1f} | {sum(spent):.1f} | "
              f"{est.reconstruction_error(Xt, 'hard'):.1e} |", flush=True)


if __name__ == "__main__":
    main()
