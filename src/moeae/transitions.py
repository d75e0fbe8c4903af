"""Transition maps between the charts of a fitted atlas, and orientability.

Two charts a and b *overlap* where both reconstruct a point of the learned manifold within a
tolerance: each expert is evaluated on every reference point, not only on its own, so its
decoder is used slightly beyond the region the router gives it (the ``best`` recipe trains
hard, one-hot charts that meet but barely overlap). An overlap may have several connected
pieces (two charts of a circle meet at both ends); each piece is one edge of the chart graph.

On each piece the transition map ``z_a -> z_b = enc_b(dec_a(z_a))`` is

- fitted by least squares with a polynomial (degree 1 for curves, 2 for surfaces), whose RMS
  residual says how well one smooth map explains the pair of charts, and
- differentiated at every point (central differences of the composed networks in float64),
  whose determinant's sign says whether the map keeps (+1) or reverses (-1) orientation.

The atlas is orientable iff each chart can be given an orientation (+1 or -1) such that every
edge's sign equals the product of its ends' orientations; a cycle with an odd number of
reversals (the Moebius band) makes that impossible (as atlasae, Paluzo-Hidalgo & Ike 2026,
decides it on a given cover).

Dimension legend: ``E`` charts, ``n`` points, ``k`` latent width, ``d`` data width.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .model import MoEAE

__all__ = ["Transition", "chart_views", "transition_maps", "orientation", "is_orientable",
           "atlas_metrics"]


class Transition(NamedTuple):
    source: int  # chart a
    target: int  # chart b
    n_points: int  # points of this piece of the overlap
    sign: int  # sign of det(d z_b / d z_a) on the piece: +1 keeps, -1 reverses orientation
    agreement: float  # fraction of the piece's points whose determinant has that sign
    residual: float  # RMS residual of the fitted map, relative to chart b's coordinate range
    centre: np.ndarray  # (d,) mean of the piece's points, for figures


@torch.no_grad()
def chart_views(model: MoEAE, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every chart's view of points X (n, d) of a population of one: coordinates (E, n, k),
    reconstruction distance relative to the data scale (E, n), and the router's chart (n,)."""
    was = model.training
    model.eval()
    x = torch.as_tensor(np.asarray(X), dtype=model.shift.dtype, device=model.shift.device)[None]
    out = model(x)
    model.train(was)
    scale = float(model.scale.reshape(-1)[0])
    err = (out.expert_outputs - x).norm(dim=-1) / scale  # (E, n)
    return (out.latents.cpu().numpy(), err.cpu().numpy(),
            out.probs[0].argmax(-1).cpu().numpy())


@torch.no_grad()
def decode_all(model: MoEAE, z: np.ndarray) -> np.ndarray:
    """Each chart's decoder at its own coordinates z (E, n, k): points (E, n, d)."""
    zz = torch.as_tensor(z, dtype=model.shift.dtype, device=model.shift.device)
    y = model.decoder(zz)  # (E, n, d) in standardised units
    return (y * model.scale[0] + model.shift[0]).cpu().numpy()


@torch.no_grad()
def encode_all(model: MoEAE, X: np.ndarray) -> np.ndarray:
    """Every chart's encoder at points X (n, d) or X (E, n, d), each chart its own: (E, n, k)."""
    x = torch.as_tensor(np.asarray(X), dtype=model.shift.dtype, device=model.shift.device)
    u = (x - model.shift[0]) / model.scale[0]
    if u.dim() == 2:
        u = u[None].expand(model.counts[0], -1, -1)
    return model.encoder(u).cpu().numpy()  # (E, n, k)


def _components(X: np.ndarray, radius: float) -> np.ndarray:
    """Connected pieces of points X (m, d) joined when closer than ``radius``: labels (m,)."""
    from scipy.sparse.csgraph import connected_components
    from sklearn.neighbors import radius_neighbors_graph

    if len(X) == 1:
        return np.zeros(1, dtype=int)
    g = radius_neighbors_graph(X, radius, mode="connectivity", include_self=False)
    return connected_components(g, directed=False)[1]


def _poly(z: np.ndarray, degree: int) -> np.ndarray:
    """Polynomial features (m, p) of z (m, k): 1, z, and for degree 2 the products."""
    cols = [np.ones(len(z))] + [z[:, i] for i in range(z.shape[1])]
    if degree >= 2:
        cols += [z[:, i] * z[:, j] for i in range(z.shape[1]) for j in range(i, z.shape[1])]
    return np.stack(cols, 1)


def _transition_jacobian(model: MoEAE, a: int, b: int, za: np.ndarray,
                         h: float = 1e-5) -> np.ndarray:
    """d z_b / d z_a of ``enc_b(dec_a(.))`` at za (m, k) by central differences: (m, k, k)."""
    E = model.counts[0]
    m, k = za.shape
    steps = np.concatenate([za + h * np.eye(k)[i] for i in range(k)] +
                           [za - h * np.eye(k)[i] for i in range(k)])  # (2 k m, k)
    z = np.zeros((E,) + steps.shape)
    z[a] = steps
    x = decode_all(model, z)[a]  # (2 k m, d)
    zb = encode_all(model, x)[b].reshape(2, k, m, k)  # (+/-, direction, point, output)
    J = (zb[0] - zb[1]) / (2 * h)  # (direction i, point, output j) = d z_b[j] / d z_a[i]
    return J.transpose(1, 2, 0)  # (m, k_out, k_in)


def _connected(covers: np.ndarray, owner: np.ndarray, charts: list[int],
               min_points: int) -> bool:
    """Whether the charts, joined where at least ``min_points`` points of either are covered
    by both (covers (E, n), owner (n,) each point's chart), form one connected graph."""
    if len(charts) < 2:
        return True
    seen, stack = {charts[0]}, [charts[0]]
    while stack:
        a = stack.pop()
        for b in charts:
            if b not in seen and (covers[a] & covers[b] & np.isin(owner, (a, b))).sum() \
                    >= min_points:
                seen.add(b)
                stack.append(b)
    return len(seen) == len(charts)


def transition_maps(model: MoEAE, X: np.ndarray, tol: float | None = None, min_points: int = 5,
                    link: float = 1.5, neighbors: int = 10) -> list[Transition]:
    """The transition maps of a population-of-one model on reference points X (n, d) of its
    manifold (e.g. its training data, or its decoded training codes).

    ``tol``: a chart covers a point when it reconstructs it within ``tol`` x the data scale
    (RMS distance to the mean); None: 3 x the 90th percentile of the distance at which each
    point's own chart reconstructs it, at least 0.005 (an overlap no wider than the charts
    are accurate), doubled up to three times while the chart graph is not connected. Only
    points the router gives to a or b count for the pair (a or b's decoder reaching across a
    third chart's region is not where a and b meet). Pieces are joined by points closer than
    ``link`` x the median distance of a point of X to its ``neighbors``-th nearest (so random
    gaps between neighbours do not split a piece); pieces of fewer than ``min_points`` points
    are left out.
    """
    from sklearn.neighbors import NearestNeighbors

    X = np.asarray(X, dtype=np.float64)
    Z, err, chart = chart_views(model, X)
    E, k = Z.shape[0], Z.shape[2]
    q = min(neighbors, len(X) - 1)
    nn = NearestNeighbors(n_neighbors=q + 1).fit(X).kneighbors(X)[0][:, q]
    radius = link * float(np.median(nn))
    if tol is None:
        own = err[chart, np.arange(len(chart))]
        tol = max(0.005, 3 * float(np.percentile(own, 90)))
        # a connected manifold has a connected chart graph: widen the overlaps (up to 8x)
        # while some used chart meets no other
        used = [e for e in range(E) if model.active[0, e] and (chart == e).any()]
        for _ in range(3):
            if _connected(err < tol, chart, used, min_points):
                break
            tol *= 2
    covers = err < tol  # (E, n)
    out = []
    for a in range(E):
        if not model.active[0, a]:
            continue
        for b in range(a + 1, E):
            if not model.active[0, b]:
                continue
            both = np.flatnonzero(covers[a] & covers[b] & ((chart == a) | (chart == b)))
            if len(both) < min_points:
                continue
            pieces = _components(X[both], radius)
            for p in np.unique(pieces):
                idx = both[pieces == p]
                if len(idx) < min_points:
                    continue
                za, zb = Z[a, idx], Z[b, idx]
                det = np.linalg.det(_transition_jacobian(model, a, b, za))
                sign = 1 if np.median(det) >= 0 else -1
                F = _poly(za, 1 if k == 1 else 2)
                coef, *_ = np.linalg.lstsq(F, zb, rcond=None)
                span = float(np.ptp(Z[b][covers[b]], axis=0).max()) or 1.0
                res = float(np.sqrt(((F @ coef - zb) ** 2).sum(1).mean())) / span
                out.append(Transition(a, b, len(idx), sign, float((np.sign(det) == sign).mean()),
                                      res, X[idx].mean(0)))
    return out


def orientation(transitions: list[Transition], n_charts: int,
                min_agreement: float = 0.75) -> tuple[np.ndarray, list[Transition]]:
    """An orientation (+1/-1) per chart consistent with the transitions' signs, by a
    breadth-first 2-colouring of the chart graph, and the transitions that contradict it
    (an empty list iff the atlas is orientable). Transitions whose sign holds on fewer than
    ``min_agreement`` of their points are not trusted and left out."""
    edges = [t for t in transitions if t.agreement >= min_agreement]
    adj: dict[int, list[tuple[int, int]]] = {c: [] for c in range(n_charts)}
    for t in edges:
        adj[t.source].append((t.target, t.sign))
        adj[t.target].append((t.source, t.sign))
    o = np.zeros(n_charts, dtype=int)
    for root in range(n_charts):
        if o[root]:
            continue
        o[root] = 1
        queue = [root]
        while queue:
            c = queue.pop()
            for nb, s in adj[c]:
                if not o[nb]:
                    o[nb] = o[c] * s
                    queue.append(nb)
    bad = [t for t in edges if o[t.source] * o[t.target] != t.sign]
    return o, bad


def is_orientable(transitions: list[Transition], n_charts: int,
                  min_agreement: float = 0.75) -> bool:
    """True iff no cycle of the chart graph has an odd number of orientation reversals."""
    return not orientation(transitions, n_charts, min_agreement)[1]


def atlas_metrics(model: MoEAE, X: np.ndarray, max_points: int = 2000) -> dict:
    """The chart graph of a population-of-one model on points X (n, d) as metrics: pieces of
    overlap (``transitions``), the largest relative residual of a fitted transition map
    (``transition_residual_max``, NaN without overlaps), reversing transitions and whether
    the atlas is orientable (1/0). At most ``max_points`` points (evenly subsampled)."""
    X = np.asarray(X, dtype=np.float64)
    X = X[np.linspace(0, len(X) - 1, min(len(X), max_points)).astype(int)]
    tr = transition_maps(model, X)
    return {"transitions": len(tr),
            "transition_residual_max": max((t.residual for t in tr), default=float("nan")),
            "transitions_reversing": sum(t.sign < 0 for t in tr),
            "orientable": int(is_orientable(tr, model.counts[0]))}
