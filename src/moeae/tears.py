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

The underfit: a hard FVU above :data:`UNDERFIT_FVU` (by latent dimension) whose residuals agree
between neighbours along the chart (:func:`residual_agreement`: the cosine between the residuals
``x - x_hat`` of each point and its nearest points *in chart coordinates*, weighted by their
lengths, above :data:`UNDERFIT_AGREEMENT`): the charts miss the data the same way over whole
stretches, which more charts fix, rather than noise, which they do not. Neighbours in the chart
and not in the data: the nearest noisy points of a point lie on its side of the curve, so their
residuals agreed by 0.53 on a noisy circle where they disagree along the chart (0.07). Measured
on the training points of automatic fits (seed 0; FVU, agreement):

- underfit: an epicycloid with 3 cusps, 2 charts: 2.2e-4, 0.98 (test FVU 2.6e-4); the band with
  3 half twists, 2 charts: 8.6e-4, 0.73 (3 charts: 3.9e-5); the turned picture, 4 charts:
  7.5e-4, 0.83;
- noise: circle (0.05) 2.5e-3, 0.07; helix (0.01) 2.0e-4, -0.06; S-curve (0.1) 3.0e-3, 0.17;
  swiss roll (0.5) 2.0e-3, 0.02; the digits (6 charts) 0.19, -0.02;
- fits that train well: FVU 2e-6-7e-5, agreement 0.4-0.9 (clean data misses coherently, but
  little); the shifting picture, 4 charts: 3.5e-4, 0.78 (test FVU 3.8e-4, within the surfaces'
  1e-3).

Solved output layers (:mod:`moeae.readout`) leave residuals that neighbours no longer share (the
solve takes out what the chart's features explain): the agreement of a model whose layers were
solved is that of its layers as trained, recorded before the solve. A 300-point coil with turns
0.3 apart (too few points for them), 10 charts: training FVU 1.4e-3, agreement 0.69 as trained,
-0.10 once solved.

The FVU limit is the curves' goal, 1e-4, for charts of one coordinate. Charts of two or more keep
4e-4, under the surfaces' goal of 1e-3: it parts the band with 3 half twists on 2 charts (seeds 0-3:
5.3e-4-1.2e-3) from the shifting picture, which meets that goal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

__all__ = ["TEAR_LIMIT", "UNDERFIT_FVU", "UNDERFIT_AGREEMENT", "UNDERFIT_GAIN", "RETRIES",
           "jump_ratio", "fvu_limit",
           "residual_agreement", "tear_ratio", "atlas_check", "needs_more", "untorn",
           "shortfall"]

TEAR_LIMIT = 4.0  # a chart whose neighbours' reconstructions jump further apart tears
#: a hard FVU above this (by latent dimension; the last for higher ones) ...
UNDERFIT_FVU = {1: 1e-4, 2: 4e-4}
UNDERFIT_AGREEMENT = 0.5  # ... with residuals that agree along the chart this much underfits
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


def residual_agreement(codes: np.ndarray, R: np.ndarray, n_neighbors: int = 10) -> float:
    """How much the residuals R (n, d) of neighbours along a chart agree: over the pairs of each
    point and its ``n_neighbors`` nearest points of the same chart in that chart's coordinates
    (codes (n, 1 + k): chart, then coordinates), ``sum <r_i, r_j> / sum |r_i| |r_j|``. Near 1
    where the charts miss the data the same way over whole stretches, near 0 for noise; 0.0
    where no such pair exists."""
    from sklearn.neighbors import NearestNeighbors

    charts, Z = codes[:, 0], codes[:, 1:]
    dot = norms = 0.0
    length = np.linalg.norm(R, axis=1)
    for c in np.unique(charts):
        idx = np.flatnonzero(charts == c)
        k = min(n_neighbors, len(idx) - 1)
        if k < 1:
            continue
        ind = NearestNeighbors(n_neighbors=k + 1).fit(Z[idx]).kneighbors(Z[idx])[1]
        i, j = np.repeat(idx, k), idx[ind[:, 1:].ravel()]
        dot += float((R[i] * R[j]).sum())
        norms += float((length[i] * length[j]).sum())
    return dot / norms if norms > 0 else 0.0


def fvu_limit(latent_dim: int) -> float:
    """The hard FVU above which charts of ``latent_dim`` coordinates underfit
    (:data:`UNDERFIT_FVU`)."""
    return UNDERFIT_FVU.get(latent_dim, UNDERFIT_FVU[max(UNDERFIT_FVU)])


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
    sample of ``max_points`` of them): ``tear`` (:func:`jump_ratio`), ``fvu`` (hard), the
    ``fvu_limit`` of its charts (:func:`fvu_limit`), ``agreement``
    (:func:`residual_agreement`; of the training points with the output layers as trained
    where they were solved afterwards, ``model.trained_agreement``) and ``used``, the charts
    the model keeps switched on."""
    from .metrics import fvu
    from .run import decode, encode

    X = _sample(X, max_points, seed)
    codes = encode(model, X)
    X_hat = decode(model, codes)
    agreement = float(model.trained_agreement[0])  # before its output layers were solved
    if agreement != agreement:  # NaN: never solved, the residuals are the network's own
        agreement = residual_agreement(codes, X - X_hat, n_neighbors)
    return {"tear": jump_ratio(X, codes[:, 0], X_hat, n_neighbors), "fvu": fvu(X, X_hat),
            "fvu_limit": fvu_limit(model.cfg.latent_dim),
            "agreement": agreement,
            "used": int(model.active[0].sum())}


def needs_more(check: dict, underfit: bool = True) -> str | None:
    """Why a checked fit (:func:`atlas_check`) needs one chart more: ``"tore"``,
    ``"underfit"`` (only with ``underfit``), or None."""
    if check["tear"] > TEAR_LIMIT:
        return "tore"
    if underfit and "fvu" in check and check["fvu"] > check["fvu_limit"] \
            and check["agreement"] > UNDERFIT_AGREEMENT:
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


def shortfall(fits: list[dict], underfit_hint: str = "", tear_hint: str = "") -> str | None:
    """What is still wrong with the last of :func:`untorn`'s fits, in one sentence ending in
    the caller's hint for that case, or None where it was kept as it was. Underfitting that
    one chart more did not cure (the turned picture: 6.8e-4, 5.7e-4 with 4 and 5 charts) wants
    steps or width, which the caller names in its own terms (the turned picture with three
    times the epochs: 1.9e-4)."""
    last = fits[-1]
    c = last["n_charts"]
    charts, s = (f"{c} charts", "") if c != 1 else ("1 chart", "s")
    after = f"after {len(fits)} fit{'s' * (len(fits) != 1)}"
    if last.get("used", c) < c:  # a chart the router never picked was switched off
        charts += f" ({last['used']} used)"
    if last["reason"] == "tore":
        return (f"{charts} still tear{s} (neighbours' reconstructions {last['tear']:.1f} times "
                f"their distance apart, limit {TEAR_LIMIT:g}) {after}{tear_hint}")
    if last["reason"] == "underfit":
        return (f"{charts} still underfit{s} (training hard FVU {last['fvu']:.1e} > "
                f"{last['fvu_limit']:.0e}, residuals agreeing {last['agreement']:.2f}) "
                f"{after}{underfit_hint}")
    return None
