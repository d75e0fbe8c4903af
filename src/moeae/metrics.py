"""Metrics of an atlas: reconstruction (soft and hard), routing, and chart shape.

All functions take a *snapshot* of one model on a test set (numpy arrays, see
:func:`moeae.training.evaluate`): ``inputs`` (n, d), ``x_soft`` (n, d), ``x_hard``
(n, d), ``chart`` (n,), ``probs`` (n, E), ``latents`` (E, n, k).

- MSE: mean over points and coordinates of the squared error (the seed's measure).
- FVU: mean squared reconstruction distance / total variance (mean squared distance to the
  mean); 0 is perfect, 1 is no better than predicting the mean. Scale-free, so curves of
  different size compare.
- Chart shape, where the true parameter ``t`` of a curve is known: along ``t``, each chart
  should be one contiguous arc (``arcs_per_chart`` = 1), and its coordinate ``z`` should move
  smoothly (``max_z_jump``: the largest step of ``z`` between neighbours in ``t`` inside one arc
  of a chart, relative to that chart's range of ``z``).
- Distortion of the charts (:mod:`moeae.geometry`): ``speed_cv_max``, the largest over charts
  of the coefficient of variation of the speed ``|dz/ds|`` along a curve (0 for isometric
  charts); and the worst point's reconstruction distance (``sup_distance_hard``) next to the
  mean (``mean_distance_hard``).
- Trustworthiness / continuity (Venna & Kaski 2001) of the atlas embedding: the codes
  ``(chart, z)`` made Euclidean by placing the charts far apart along the first axis.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["snapshot_metrics", "aggregate", "atlas_embedding", "chart_shape", "fvu",
           "USED_FRACTION"]

USED_FRACTION = 0.01  # an expert counts as used when it is the argmax for >= 1% of points


def fvu(x, x_hat) -> float:
    """Fraction of variance unexplained by ``x_hat`` (n, d) for ``x`` (n, d)."""
    total = ((x - x.mean(0)) ** 2).sum(1).mean()
    return float(((x - x_hat) ** 2).sum(1).mean() / max(total, 1e-300))


def hard_latent(snap) -> np.ndarray:
    """z of each point in its own chart: (n, k)."""
    lat, chart = snap["latents"], snap["chart"]
    return lat[chart, np.arange(len(chart))]


def atlas_embedding(chart: np.ndarray, z: np.ndarray, gap: float = 10.0) -> np.ndarray:
    """(n,) charts and (n, k) coordinates -> (n, k) points, chart c shifted by ``c * gap``
    along the first axis (tanh latents lie in [-1, 1], so charts never overlap; arc-length
    codes, :mod:`moeae.arclength`, are as long as their charts: the gap grows with them)."""
    emb = np.array(z, dtype=np.float64, copy=True)
    if len(emb):
        gap = max(gap, 3.0 * float(np.abs(emb[:, 0]).max()))
    emb[:, 0] += gap * chart
    return emb


def chart_shape(chart: np.ndarray, z: np.ndarray, t: np.ndarray, closed: bool) -> dict:
    """Arcs per chart and the largest jump of z inside a chart, along a curve parameter t.

    ``closed``: the curve closes on itself, so a run of one chart may wrap around the seam.
    """
    order = np.argsort(t, kind="stable")
    c, zz = chart[order], z[order, 0]
    n = len(c)
    if closed and n > 1:
        starts = np.flatnonzero(c != np.roll(c, 1))
        if len(starts):  # begin the sequence at a chart boundary so no run wraps
            c, zz = np.roll(c, -starts[0]), np.roll(zz, -starts[0])
    boundaries = np.flatnonzero(c[1:] != c[:-1]) + 1
    starts = np.r_[0, boundaries]
    ends = np.r_[boundaries, n]
    run_charts = c[starts]
    arcs = {int(k): int((run_charts == k).sum()) for k in np.unique(c)}
    span = {int(k): float(zz[c == k].max() - zz[c == k].min()) for k in np.unique(c)}
    jump = 0.0
    for a, b, k in zip(starts, ends, run_charts):  # inside each arc: two arcs of one chart
        if b - a < 2:  # (a V through a crossing) need not meet end to end in t
            continue
        if span[int(k)] <= 0:
            return {"max_arcs_per_chart": max(arcs.values()), "max_z_jump": math.inf}
        jump = max(jump, float(np.abs(np.diff(zz[a:b])).max() / span[int(k)]))
    return {"max_arcs_per_chart": max(arcs.values()), "max_z_jump": jump}


def trustworthiness(X: np.ndarray, E: np.ndarray, n_neighbors: int = 5) -> float:
    """Trustworthiness of embedding E (n, k) of X (n, d) (Venna & Kaski 2001), as
    ``sklearn.manifold.trustworthiness`` computes it, without its full argsort: the rank of
    each embedding neighbour in X is a count of closer points. ~10x faster at n = 1000."""
    X, E = np.asarray(X, dtype=np.float64), np.asarray(E, dtype=np.float64)
    n, k = len(X), n_neighbors
    if not 0 < k < n / 2:
        raise ValueError(f"n_neighbors ({k}) must be in (0, n_samples / 2) = (0, {n / 2})")
    sq = (X * X).sum(1)
    dx = sq[:, None] + sq[None, :] - 2 * X @ X.T  # (n, n) squared distances in X
    np.fill_diagonal(dx, -np.inf)  # self counts as closest, making ranks 1-based
    se = (E * E).sum(1)
    de = se[:, None] + se[None, :] - 2 * E @ E.T
    np.fill_diagonal(de, np.inf)
    nn = np.argpartition(de, k - 1, axis=1)[:, :k]  # (n, k) neighbours in the embedding
    thr = np.take_along_axis(dx, nn, 1)  # (n, k)
    rank = np.empty((n, k), dtype=np.int64)
    for i in range(0, n, 256):  # bounded memory: (256, k, n) comparisons at a time
        rank[i:i + 256] = (dx[i:i + 256, None, :] < thr[i:i + 256, :, None]).sum(-1)
    penalty = np.maximum(rank - k, 0).sum()
    return float(1.0 - penalty * (2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0))))


def snapshot_metrics(snap: dict, t: np.ndarray | None = None, closed: bool = False,
                     neighborhood: bool = True, neighbors: int = 10,
                     max_points: int = 2000) -> dict:
    """All metrics of one model's snapshot as a flat dict of floats.

    ``t``: the true parameter (n,) of a curve, for chart shape; ``closed``: whether the curve
    is closed. ``neighborhood=False`` skips trustworthiness and continuity (NaN); they use
    at most ``max_points`` points (evenly subsampled) since they cost O(n^2).
    """
    x, chart, probs = snap["inputs"], snap["chart"], snap["probs"]
    n = len(x)
    counts = np.bincount(chart, minlength=probs.shape[1])
    p = np.clip(probs, 1e-12, 1.0)
    out = {
        "mse_soft": float(((x - snap["x_soft"]) ** 2).mean()),
        "mse_hard": float(((x - snap["x_hard"]) ** 2).mean()),
        "fvu_soft": fvu(x, snap["x_soft"]),
        "fvu_hard": fvu(x, snap["x_hard"]),
        "experts_used": int((counts >= USED_FRACTION * n).sum()),
        "top_prob": float(probs.max(1).mean()),
        "entropy": float(-(probs * np.log(p)).sum(1).mean()),
    }
    dist = np.linalg.norm(x - snap["x_hard"], axis=1)
    out["mean_distance_hard"] = float(dist.mean())
    out["sup_distance_hard"] = float(dist.max())
    z = hard_latent(snap)
    if t is not None and np.ndim(t) == 1 and z.shape[1] == 1:
        out.update(chart_shape(chart, z, np.asarray(t), closed))
        from .geometry import speed_cv

        cv = speed_cv(chart, z, x, np.asarray(t), closed)
        out["speed_cv_max"] = max(cv.values()) if cv else math.nan
    else:
        out.update({"max_arcs_per_chart": math.nan, "max_z_jump": math.nan,
                    "speed_cv_max": math.nan})
    idx = np.linspace(0, n - 1, min(n, max_points)).astype(int)
    k = min(neighbors, max(1, len(idx) // 2 - 1))
    if neighborhood and len(idx) > 3:
        emb = atlas_embedding(chart[idx], z[idx])
        out["trustworthiness"] = float(trustworthiness(x[idx], emb, n_neighbors=k))
        out["continuity"] = float(trustworthiness(emb, x[idx], n_neighbors=k))
    else:
        out["trustworthiness"] = out["continuity"] = math.nan
    return out


def aggregate(rows: list[dict], keys: list[str]) -> list[dict]:
    """Group rows by ``keys`` and report the mean and sd (ddof=1; 0 for one row) of every
    other numeric column: ``col`` is the mean, ``col_sd`` the sd, ``n_seeds`` the count."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(keys, key))
        row["n_seeds"] = len(rs)
        for col in rs[0]:
            if col in keys or col == "seed" or not isinstance(rs[0][col], (int, float)):
                continue
            vals = np.array([r[col] for r in rs], dtype=np.float64)
            with np.errstate(invalid="ignore"):  # inf or NaN columns give NaN, quietly
                row[col] = float(vals.mean())
                row[f"{col}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out.append(row)
    return out
