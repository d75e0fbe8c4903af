"""Whether a trained automatic atlas needs one chart more: it tears, or it underfits.

A chart *tears* where its encoder jumps: two neighbouring points of the same chart whose
reconstructions land far apart. The chart count that :func:`moeae.atlas.choose_charts` reads
off the neighbour graph can be too low for what a chart trains to in its budget: scikit-learn's
S-curve lies flat and folds no more than the swiss roll's halves (fold 3.6 against 3.8), yet
one chart for the whole S tore at the middle on two of three seeds. So an automatic count is
checked after training and refitted with one chart more while it tears or underfits (at most
:data:`RETRIES` times).

The tear (:func:`jump_ratio`): over the pairs of each point and its ``n_neighbors`` nearest
neighbours that share a chart, the largest distance between their reconstructions divided by
their own distance (or by a quarter of the median neighbour distance where that is larger, so
near-duplicate points do not count). Fits that train well stayed at 1.0-2.3 (seed 0: circle,
figure-8, spiral, helix with and without noise, turned picture, sphere, torus, swiss roll with
and without noise, cylinder, Moebius band, band with 3 half twists, helicoid, S-curve with
noise 0.1); single-chart S-curves that tore (6 of seeds 0-9) reached 8.8-15.6.

The underfit: a hard FVU above :data:`UNDERFIT_FVU` whose residuals agree between neighbours
(:func:`residual_agreement`, the mean cosine between the residuals ``x - x_hat`` of each point
and its same-chart neighbours, above :data:`UNDERFIT_AGREEMENT`): the charts miss the surface
the same way over whole regions, which more charts fix, rather than noise, which they do not.
Measured on the training points of automatic fits (seed 0 unless said):

- band with 3 half twists, 2 charts, seeds 0-3: FVU 5.3e-4-1.2e-3, agreement 0.77-0.79 (with
  3 charts 3.9e-5);
- turned picture, 4 charts: 6.8e-4, 0.85;
- noise: circle (0.05) 2.5e-3, 0.53; S-curve (0.1) 2.9e-3, 0.33; swiss roll (0.5) 2.0e-3, 0.13;
  helix 2.3e-4, -0.02; the digits (6 charts) 0.23, 0.28;
- shifting picture, 4 charts: 3.5e-4, 0.81 (test FVU 3.8e-4, within the surfaces' 1e-3);
- fits that train well: FVU 2e-6-6e-5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

__all__ = ["TEAR_LIMIT", "UNDERFIT_FVU", "UNDERFIT_AGREEMENT", "UNDERFIT_GAIN", "RETRIES",
           "jump_ratio",
           "residual_agreement", "tear_ratio", "atlas_check", "needs_more", "untorn"]

TEAR_LIMIT = 4.0  # a chart whose neighbours' reconstructions jump further apart tears
UNDERFIT_FVU = 4e-4  # a hard FVU above this ...
UNDERFIT_AGREEMENT = 0.7  # ... with residuals that agree between neighbours this much underfits
UNDERFIT_GAIN = 0.5  # after an underfit refit, another only if that one cut the FVU this much
RETRIES = 2  # refits with one chart more, at most

T = TypeVar("T")


def _pairs(X: np.ndarray, charts: np.ndarray, n_neighbors: int):
    """Each point and its ``n_neighbors`` nearest neighbours in the same chart: (i, j, |x_i -
    x_j|) over those pairs, and the median neighbour distance; None without such pairs."""
    from sklearn.neighbors import NearestNeighbors

    n = len(X)
    k = min(n_neighbors, n - 1)
    if k < 1:
        return None
    dist, ind = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X)
    i = np.repeat(np.arange(n), k)
    j, d = ind[:, 1:].ravel(), dist[:, 1:].ravel()
    same = charts[i] == charts[j]
    if not same.any():
        return None
    return i[same], j[same], d[same], float(np.median(d))


def jump_ratio(X: np.ndarray, charts: np.ndarray, X_hat: np.ndarray,
               n_neighbors: int = 10) -> float:
    """The largest ``|x_hat_i - x_hat_j| / max(|x_i - x_j|, m / 4)`` (m: the median neighbour
    distance) over pairs of neighbours (each point and its ``n_neighbors`` nearest) in the
    same chart; 1.0 where no such pair exists. X, X_hat: (n, d); charts: (n,)."""
    pairs = _pairs(X, charts, n_neighbors)
    if pairs is None:
        return 1.0
    i, j, d, median = pairs
    floor = max(0.25 * median, np.finfo(np.float64).tiny)
    jump = np.linalg.norm(X_hat[i] - X_hat[j], axis=1)
    return float((jump / np.maximum(d, floor)).max())


def residual_agreement(X: np.ndarray, charts: np.ndarray, X_hat: np.ndarray,
                       n_neighbors: int = 10) -> float:
    """The mean cosine between the residuals ``x - x_hat`` of neighbours (each point and its
    ``n_neighbors`` nearest) in the same chart: near 1 where the charts miss the data the same
    way over whole regions, near 0 for noise; 0.0 where no such pair exists."""
    pairs = _pairs(X, charts, n_neighbors)
    if pairs is None:
        return 0.0
    i, j, _, _ = pairs
    R = X - X_hat
    norm = np.linalg.norm(R, axis=1)
    cos = (R[i] * R[j]).sum(1) / np.maximum(norm[i] * norm[j], np.finfo(np.float64).tiny)
    return float(cos.mean())


def _sample(X, max_points: int, seed: int) -> np.ndarray:
    if len(X) > max_points:
        X = X[np.sort(np.random.default_rng(seed).choice(len(X), max_points, replace=False))]
    return np.asarray(X, dtype=np.float64)


def tear_ratio(model, X, n_neighbors: int = 10, max_points: int = 2000, seed: int = 0) -> float:
    """:func:`jump_ratio` of a trained model (a population of one) on points X (an array or
    memory map), or on a seeded sample of ``max_points`` of them; each point decoded by the
    chart it is encoded in (the ``tear`` of :func:`atlas_check`)."""
    return atlas_check(model, X, n_neighbors, max_points, seed)["tear"]


def atlas_check(model, X, n_neighbors: int = 10, max_points: int = 2000,
                seed: int = 0) -> dict[str, float]:
    """What decides whether a trained model needs one chart more, on points X (or a seeded
    sample of ``max_points`` of them): ``tear`` (:func:`jump_ratio`), ``fvu`` (hard) and
    ``agreement`` (:func:`residual_agreement`)."""
    from .metrics import fvu
    from .run import decode, encode

    X = _sample(X, max_points, seed)
    codes = encode(model, X)
    X_hat = decode(model, codes)
    return {"tear": jump_ratio(X, codes[:, 0], X_hat, n_neighbors), "fvu": fvu(X, X_hat),
            "agreement": residual_agreement(X, codes[:, 0], X_hat, n_neighbors)}


def needs_more(check: dict, underfit: bool = True) -> str | None:
    """Why a checked fit (:func:`atlas_check`) needs one chart more: ``"tore"``,
    ``"underfit"`` (only with ``underfit``), or None."""
    if check["tear"] > TEAR_LIMIT:
        return "tore"
    if underfit and check.get("fvu", 0.0) > UNDERFIT_FVU \
            and check.get("agreement", 0.0) > UNDERFIT_AGREEMENT:
        return "underfit"
    return None


def untorn(fit: Callable[[int], tuple[T, dict]], n_charts: int, max_charts: int,
           retries: int = RETRIES, underfit: bool = True) -> tuple[T, list[dict]]:
    """``fit(c)`` trains with ``c`` charts and returns ``(result, check)`` (a dict as
    :func:`atlas_check` returns). Called with ``n_charts``, then with one chart more while
    :func:`needs_more` finds a reason, up to ``retries`` times or ``max_charts``. ``underfit``
    False: only tears count (a budget cut below the recipe's underfits for want of steps,
    which more charts do not give: a circle trained 2 epochs "underfits"). After a
    refit for underfitting, another only where that chart cut the FVU to
    :data:`UNDERFIT_GAIN` of the fit before (else more charts are not what it lacks: the
    turned picture went 6.8e-4, 5.7e-4, 4.2e-4 with 4, 5, 6 charts). Returns the last result
    and, per fit, ``n_charts``, the check's values and ``reason`` (None for a fit that was kept
    as it was)."""
    log: list[dict] = []
    for attempt in range(retries + 1):
        result, check = fit(n_charts)
        reason = needs_more(check, underfit)
        futile = (reason == "underfit" and bool(log) and log[-1]["reason"] == "underfit"
                  and check["fvu"] > UNDERFIT_GAIN * log[-1]["fvu"])
        log.append({"n_charts": n_charts, **check, "reason": reason})
        if reason is None or futile or n_charts >= max_charts or attempt == retries:
            break
        n_charts += 1
    return result, log
