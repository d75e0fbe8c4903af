"""Geometry of the charts: decoder Jacobians, isometry and folding terms, and distortion
measures of a fitted atlas.

A chart e maps its coordinates z to the data by its decoder ``D_e``; its Jacobian
``J = dD_e/dz`` (d, k) says how lengths change. The chart keeps lengths up to one scale
``s_e`` when ``J^T J = s_e^2 I`` (isometric autoencoders, Gropp et al. 2020). Following the
relaxed distortion of IRVAE (Lee et al. 2022), the scale is not a parameter but the chart's
mean squared stretch over its points, so the term is scale-free and only the *variation* of the
stretch is penalised::

    r = |J v|^2 for a unit direction v,   s_e^2 = mean_b r,   isometry = mean_b (r / s_e^2 - 1)^2

which is zero for every v iff ``J^T J = s_e^2 I``. The folding guard keeps each stretch within a
band ``[s_e / c, c s_e]`` (a fold or a collapse has a singular value near zero)::

    guard = mean_b relu(|log(r / s_e^2)| - 2 log c)^2

Dimension legend: ``G`` experts of a population, ``B`` batch, ``k`` latent width, ``d`` data.
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch

from .layers import StackedLinear, StackedMLP

__all__ = ["stacked_jvp", "stretch", "isometry_terms", "speed_cv", "distance_ratio_spread",
           "flat_coordinates", "swiss_roll_arclength", "great_circle"]

# derivatives of the hidden activations (moeae.layers.HIDDEN), as functions of the
# pre-activation a
_DERIV = {
    "relu": lambda a: (a > 0).to(a.dtype),
    "tanh": lambda a: 1 - torch.tanh(a) ** 2,
    "silu": lambda a: torch.sigmoid(a) * (1 + a * (1 - torch.sigmoid(a))),
    "softplus": torch.sigmoid,
}


def _name(mlp: StackedMLP) -> str:
    from .layers import HIDDEN

    return next(k for k, f in HIDDEN.items() if f is mlp.hidden)


def stacked_jvp(mlp: StackedMLP, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    """Output and Jacobian-vector product of every group of a stacked MLP, in one pass.

    x (G, B, in), v (G, B, in) -> (y, J v), each (G, B, out). The tangent travels with the
    input through every layer (forward-mode differentiation written out), so the result is
    differentiable by ordinary autograd. Measured on one core for 8 decoders of 100 x 4 and 64
    points, forward and backward: 14 ms against 23 ms for ``torch.func.jvp``, with identical
    values. Points and tangents each take their own product per layer, the points exactly the
    forward pass's (so ``y`` equals it bit for bit); one product of the two stacked copied both
    at every layer (without the copies, 4 decoders on 20,000 points in float64 took 0.65-0.89
    of the time; 8 decoders on 64 points, forward and backward, 0.77-1.06).
    """
    deriv = _DERIV[_name(mlp)]
    *hidden, last = [cast(StackedLinear, layer) for layer in mlp.layers]
    h, t = x, v
    for layer in hidden:
        pre = torch.baddbmm(layer.bias, h, layer.weight)  # (G, B, width)
        t = torch.bmm(t, layer.weight) * deriv(pre)  # the tangent gets no bias
        h = mlp.hidden(pre)
    y = torch.baddbmm(last.bias, h, last.weight)
    jv = torch.bmm(t, last.weight)  # (G, B, out)
    if mlp.activation == "tanh":
        y = torch.tanh(y)
        jv = jv * (1 - y**2)
    return y, jv


def stretch(decoder: StackedMLP, z: torch.Tensor, generator: torch.Generator | None = None,
            v: torch.Tensor | None = None) -> torch.Tensor:
    """Squared stretch ``r = |J v|^2`` of each decoder at its points z (G, B, k) along a unit
    direction v (G, B, k), random (uniform on the sphere) unless given: (G, B)."""
    if v is None:
        v = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    _, jv = stacked_jvp(decoder, z, v)
    return (jv**2).sum(-1)  # (G, B)


def isometry_terms(r: torch.Tensor, w: torch.Tensor, band: float,
                   bsum=lambda t: t.sum(1)) -> tuple[torch.Tensor, torch.Tensor,
                                                     torch.Tensor, torch.Tensor]:
    """Isometry and folding terms per expert from squared stretches r (G, B) weighted by each
    point's membership w (G, B) of the expert's chart.

    ``bsum`` sums over the batch (dim 1; across ranks under data parallelism). Returns
    ``(isometry, guard, mass, s2)``, each (G,): weighted means over the chart's points, the
    chart's total weight in the batch, and its scale ``s_e^2``.
    """
    mass = bsum(w)  # (G,)
    s2 = bsum(w * r) / mass.clamp_min(1e-12)  # (G,) the chart's mean squared stretch
    # a chart with no points in the batch: any finite scale (its terms are weighted by 0)
    s2 = torch.where(mass > 1e-6, s2, torch.ones_like(s2))
    ratio = r / s2[:, None].clamp_min(1e-20)  # (G, B)
    iso = bsum(w * (ratio - 1) ** 2) / mass.clamp_min(1e-12)
    excess = (ratio.clamp_min(1e-20).log().abs() - 2 * math.log(band)).clamp_min(0.0)
    guard = bsum(w * excess**2) / mass.clamp_min(1e-12)
    return iso, guard, mass, s2


# -- distortion of a fitted atlas, where the true parameter is known --------------------------

def speed_cv(chart: np.ndarray, z: np.ndarray, X: np.ndarray, t: np.ndarray,
             closed: bool = False, min_pairs: int = 10) -> dict[int, float]:
    """Coefficient of variation of the speed ``|dz/ds|`` along each chart of a curve.

    Points are ordered by their curve parameter t (n,); ``s`` is arc length, measured by the
    chord between consecutive points X (n, d) (a fine test grid). Only consecutive pairs in the
    same chart count, and only pairs of distinct points: a grid of a closed curve that holds
    both ends of its parameter range (``t = 0`` and ``2 pi``) has the same point twice, 1e-16
    apart, and the ratio of two rounding errors is no speed. Returns {chart: CV} for charts
    with at least ``min_pairs`` pairs; an isometric chart has CV 0.
    """
    order = np.argsort(t, kind="stable")
    c, zz, xx = chart[order], z[order, 0], X[order]
    if closed:  # the pair across the seam counts as any other
        c, zz, xx = np.r_[c, c[:1]], np.r_[zz, zz[:1]], np.r_[xx, xx[:1]]
    same = c[1:] == c[:-1]
    ds = np.linalg.norm(np.diff(xx, axis=0), axis=1)
    speed = np.abs(np.diff(zz)) / np.maximum(ds, 1e-300)
    distinct = ds > 1e-9 * np.median(ds)
    out = {}
    for e in np.unique(c):
        s = speed[same & (c[:-1] == e) & distinct]
        if len(s) >= min_pairs:
            with np.errstate(invalid="ignore", over="ignore"):  # NaN for a degenerate chart
                out[int(e)] = float(s.std() / max(s.mean(), 1e-300))
    return out


def distance_ratio_spread(chart: np.ndarray, z: np.ndarray, U: np.ndarray,
                          n_neighbors: int = 10, q: float = 5.0, metric=None) -> float:
    """Spread of chart distance / true geodesic distance between neighbours on a surface.

    U (n, k): the surface's own flat (isometric) coordinates, where geodesic distance is
    Euclidean (the unrolled swiss roll, the cut-open cylinder). For each point, its
    ``n_neighbors`` nearest neighbours in U that lie in the same chart give ratios
    ``|z_i - z_j| / |U_i - U_j|``; each chart's ratios are divided by their median (one scale
    per chart is allowed) and the result is the ratio of the (100 - q)th to the qth percentile
    over all pairs: 1 for isometric charts.

    ``metric(A, B)``: geodesic distances between rows of A and B (m, n_neighbors, ...) when U
    are not flat coordinates but points of a curved surface (the sphere: great circles); the
    neighbours are then found in U by Euclidean distance.
    """
    from sklearn.neighbors import NearestNeighbors

    ratios = []
    for e in np.unique(chart):
        idx = np.flatnonzero(chart == e)
        if len(idx) <= n_neighbors:
            continue
        dist, nn = NearestNeighbors(n_neighbors=n_neighbors + 1).fit(U[idx]).kneighbors(U[idx])
        dz = np.linalg.norm(z[idx][:, None] - z[idx][nn[:, 1:]], axis=-1)  # (m, n_neighbors)
        if metric is not None:
            dist = np.c_[np.zeros(len(idx)), metric(U[idx][:, None], U[idx][nn[:, 1:]])]
        r = (dz / np.maximum(dist[:, 1:], 1e-300)).ravel()
        ratios.append(r / np.median(r))
    if not ratios:
        return math.nan
    r = np.concatenate(ratios)
    lo, hi = np.percentile(r, [q, 100 - q])
    return float(hi / max(lo, 1e-300))


def swiss_roll_arclength(t: np.ndarray) -> np.ndarray:
    """Arc length of the swiss roll's spiral ``(t cos t, t sin t)`` from 0 to t:
    ``(t sqrt(1 + t^2) + asinh t) / 2``."""
    t = np.asarray(t, dtype=np.float64)
    return 0.5 * (t * np.sqrt(1 + t**2) + np.arcsinh(t))


def flat_coordinates(name: str, t: np.ndarray, **params) -> np.ndarray | None:
    """Isometric flat coordinates (n, 2) of a surface from its true parameters t (n, 2), for
    the data sets that are intrinsically flat; None for the others (sphere, torus)."""
    t = np.asarray(t, dtype=np.float64)
    if name == "swiss_roll":
        return np.c_[swiss_roll_arclength(t[:, 0]), t[:, 1]]
    if name == "cylinder":
        return np.c_[params.get("radius", 1.0) * t[:, 0], t[:, 1]]
    return None


def great_circle(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Great-circle distance between points of a sphere centred at 0 (radius from A)."""
    r = np.linalg.norm(A, axis=-1)
    cos = (A * B).sum(-1) / (r * np.linalg.norm(B, axis=-1))
    return r * np.arccos(np.clip(cos, -1.0, 1.0))
