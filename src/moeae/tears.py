"""Whether a trained atlas tears, and one chart more where it does (``n_experts="auto"``).

A chart *tears* where its encoder jumps: two neighbouring points of the same chart whose
reconstructions land far apart. The chart count that :func:`moeae.atlas.choose_charts` reads
off the neighbour graph can be too low for what a chart trains to in its budget: scikit-learn's
S-curve lies flat and folds no more than the swiss roll's halves (fold 3.6 against 3.8), yet
one chart for the whole S tore at the middle on two of three seeds. So an automatic count is
checked after training and refitted with one chart more while it tears (at most
:data:`RETRIES` times).

The measure (:func:`jump_ratio`): over the pairs of each point and its ``n_neighbors``
nearest neighbours that share a chart, the largest distance between their reconstructions
divided by their own distance (or by a quarter of the median neighbour distance where that is
larger, so near-duplicate points do not count). Fits that train well stayed at 1.0-2.3 (seed 0:
circle, figure-8, spiral, helix with and without noise, turned picture, sphere, torus, swiss
roll with and without noise, cylinder, Moebius band, band with 3 half twists, helicoid, S-curve
with noise 0.1); single-chart S-curves that tore (6 of seeds 0-9) reached 8.8-15.6.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

__all__ = ["TEAR_LIMIT", "RETRIES", "jump_ratio", "tear_ratio", "untorn"]

TEAR_LIMIT = 4.0  # a chart whose neighbours' reconstructions jump further apart tears
RETRIES = 2  # refits with one chart more, at most

T = TypeVar("T")


def jump_ratio(X: np.ndarray, charts: np.ndarray, X_hat: np.ndarray,
               n_neighbors: int = 10) -> float:
    """The largest ``|x_hat_i - x_hat_j| / max(|x_i - x_j|, m / 4)`` (m: the median neighbour
    distance) over pairs of neighbours (each point and its ``n_neighbors`` nearest) in the
    same chart; 1.0 where no such pair exists. X, X_hat: (n, d); charts: (n,)."""
    from sklearn.neighbors import NearestNeighbors

    n = len(X)
    k = min(n_neighbors, n - 1)
    if k < 1:
        return 1.0
    dist, ind = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X)
    i = np.repeat(np.arange(n), k)
    j, d = ind[:, 1:].ravel(), dist[:, 1:].ravel()
    same = charts[i] == charts[j]
    if not same.any():
        return 1.0
    floor = max(0.25 * float(np.median(d)), np.finfo(np.float64).tiny)
    jump = np.linalg.norm(X_hat[i[same]] - X_hat[j[same]], axis=1)
    return float((jump / np.maximum(d[same], floor)).max())


def tear_ratio(model, X, n_neighbors: int = 10, max_points: int = 2000, seed: int = 0) -> float:
    """:func:`jump_ratio` of a trained model (a population of one) on points X (an array or
    memory map), or on a seeded sample of ``max_points`` of them; each point decoded by the
    chart it is encoded in."""
    from .run import decode, encode

    if len(X) > max_points:
        X = X[np.sort(np.random.default_rng(seed).choice(len(X), max_points, replace=False))]
    X = np.asarray(X, dtype=np.float64)
    codes = encode(model, X)
    return jump_ratio(X, codes[:, 0], decode(model, codes), n_neighbors)


def untorn(fit: Callable[[int], tuple[T, float]], n_charts: int, max_charts: int,
           retries: int = RETRIES) -> tuple[T, list[dict]]:
    """``fit(c)`` trains with ``c`` charts and returns ``(result, tear ratio)``. Called with
    ``n_charts``, then with one chart more while the ratio exceeds :data:`TEAR_LIMIT`, up to
    ``retries`` times or ``max_charts``. Returns the last result and, per fit, ``n_charts``
    and ``tear``."""
    log = []
    for attempt in range(retries + 1):
        result, ratio = fit(n_charts)
        log.append({"n_charts": n_charts, "tear": ratio})
        if ratio <= TEAR_LIMIT or n_charts >= max_charts or attempt == retries:
            break
        n_charts += 1
    return result, log
