"""A neighbour graph along the manifold, not across it: what the starting atlas's geodesics run on.

*Tangent filtering*: each point's tangent space is the top ``dim`` principal directions of its
nearest neighbours, and an edge is kept only when it runs along the tangent space at both of its
ends. Where a curve crosses itself (the figure-8's waist), plain k-NN edges jump between the
branches and geodesics take the shortcut; filtered edges do not.

*Noise*: a point's nearest neighbours then scatter across the curve as much as along it, so its
tangent is not found and the filter fails. The filter is tried again on smoothed points (each
moved to the mean of its nearest neighbours, the same neighbours each time, up to
:data:`SMOOTHING` times, first over its 10 nearest, then over 30); only the graph comes from
them, the data are not changed. With noise 0.01, 0.02 and 0.05 on the figure-8 (1000 points,
spaced about 0.006 along the curve) the filter held after 1 and 4 smoothings over 10 and 5-7
over 30, and the neighbour graph gave 2 charts where the plain graph gave 15, 10 and 12-13; a
trefoil knot with noise 0.05 got 3 charts instead of 10. Where no smoothing helps (the figure-8
with noise 0.1, the digits), the plain graph is used, with every point clean.
"""

from __future__ import annotations

import numpy as np

__all__ = ["neighbour_graph", "SMOOTHING", "WIDER"]

SMOOTHING = 10  # at most this many smoothings of noisy points over each neighbourhood ...
WIDER = 3  # ... first the n_neighbors nearest, then this many times as many


def neighbour_graph(X: np.ndarray, n_neighbors: int, dim: int, max_ambiguity: float = 0.2,
                    min_alignment: float = 0.9, reach: int = 5,
                    smoothing: int = SMOOTHING) -> tuple:
    """A graph along the manifold: ``(graph, clean)``, a symmetric sparse (n, n) matrix of edge
    lengths and a mask of the points that have edges.

    Each point's tangent space is the top ``dim`` principal directions of its ``n_neighbors``
    nearest neighbours. A point is *ambiguous* when the next singular value exceeds
    ``max_ambiguity`` times the last tangent one (two branches through a crossing, or noise)
    and gets no edges. Clean points connect to those of their ``reach * n_neighbors`` nearest
    clean points that lie along the tangent space at both ends (cosine >= ``min_alignment``)
    and stray from it by no more than the larger of the two ends' neighbourhood radii (two
    turns of a coil that nearly touch are not joined by a long, shallow edge); this bridges
    the gap the ambiguous points leave along each branch but not across. (Reach 3 left the
    figure-8's loop broken at its waist on some samples: a chain, not a loop.)

    The filter fails when too few points are clean (< 80%) or its graph has more components
    than the plain k-NN graph. It is then tried on the points smoothed 1, 2, ...,
    ``smoothing`` times (each the mean of its ``n_neighbors`` nearest and itself), then again
    over :data:`WIDER` times as many neighbours (each only where it is at most a tenth of the
    points), and the first graph that holds is returned,
    its edges as long as between the smoothed points (its components no more than those of
    X's plain graph: smoothing can pull a sparse stretch apart); else the plain graph of X,
    with every point clean.
    """
    from scipy.sparse.csgraph import connected_components
    from sklearn.neighbors import NearestNeighbors

    n = len(X)
    k = min(n_neighbors, n - 1)
    plain, found = _filtered(X, k, dim, max_ambiguity, min_alignment, reach)
    if found is not None:
        return found
    if dim < X.shape[1] and k > dim + 1:
        parts = connected_components(plain, directed=False)[0]  # of the data, not smoothed
        # a neighbourhood of at most a tenth of the data, else smoothing shrinks the data
        # itself (30 points averaged over 29 are one point)
        for width in [w for w in (k, WIDER * k) if w <= n // 10]:
            nn = NearestNeighbors(n_neighbors=width + 1).fit(X).kneighbors(X)[1]
            Y = np.asarray(X, dtype=np.float64)
            for _ in range(smoothing):
                Y = Y[nn].mean(1)
                _, found = _filtered(Y, k, dim, max_ambiguity, min_alignment, reach, parts)
                if found is not None:
                    return found
    return plain, np.ones(n, dtype=bool)


def _filtered(X: np.ndarray, k: int, dim: int, max_ambiguity: float, min_alignment: float,
              reach: int, parts: int | None = None) -> tuple:
    """``(plain, (graph, clean))``: the plain k-NN graph of X and the tangent-filtered one
    with its clean points, or ``(plain, None)`` where the filter fails (more components than
    ``parts``, by default the plain graph's); the plain graph alone where no tangent can be
    estimated (``dim`` >= the data's width, or too few neighbours), as ``(plain, (plain,
    every point))``."""
    from scipy.sparse.csgraph import connected_components
    from sklearn.neighbors import NearestNeighbors

    n = len(X)
    dist0, nn = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X)
    plain = _graph(np.repeat(np.arange(n), k), nn[:, 1:].ravel(), dist0[:, 1:].ravel(), n)
    if dim >= X.shape[1] or k <= dim + 1:
        return plain, (plain, np.ones(n, dtype=bool))
    nb = X[nn[:, 1:]] - X[nn[:, 1:]].mean(1, keepdims=True)  # (n, k, d)
    _, sv, vt = np.linalg.svd(nb, full_matrices=False)
    clean = sv[:, dim] <= max_ambiguity * sv[:, dim - 1]
    if clean.sum() < 0.8 * n:
        return plain, None
    tangent = vt[:, :dim]  # (n, dim, d)
    idx = np.flatnonzero(clean)
    kk = min(reach * k, len(idx) - 1)
    dist, nn = NearestNeighbors(n_neighbors=kk + 1).fit(X[idx]).kneighbors(X[idx])
    rows, cols = np.repeat(idx, kk), idx[nn[:, 1:].ravel()]
    v = X[cols] - X[rows]
    # the smallest normal number of X's own type: 1e-300 is 0 in float32, and a repeated point
    # (an edge of length 0) then divided 0 by 0
    norm = np.maximum(np.linalg.norm(v, axis=1), np.finfo(v.dtype).tiny)
    coords = np.einsum("ekd,ed->ek", tangent[rows], v)  # the edge in i's tangent coordinates
    along_i = np.linalg.norm(coords, axis=1) / norm
    along_j = np.linalg.norm(np.einsum("ekd,ed->ek", tangent[cols], v), axis=1) / norm
    radius = dist0[:, -1]  # each point's distance to its k-th neighbour
    stray = np.sqrt(np.clip(1 - np.minimum(along_i, along_j) ** 2, 0, None)) * norm
    keep = ((along_i >= min_alignment) & (along_j >= min_alignment)
            & (stray <= np.maximum(radius[rows], radius[cols])))
    # each point keeps its nearest few kept edges in each orthant of its tangent space (along
    # a curve: each side): gaps are still bridged, and shortest paths stay cheap (every kept
    # edge of 1000 figure-8 points: 2.1 s of shortest paths)
    orthant = ((coords > 0) * (2 ** np.arange(dim))).sum(1).reshape(len(idx), kk)
    keep = keep.reshape(len(idx), kk)
    few = np.zeros_like(keep)
    per = -(-k // 2**dim) + 1
    for o in range(2**dim):
        mine = keep & (orthant == o)
        few |= mine & (np.cumsum(mine, axis=1) <= per)
    keep = few.ravel()
    graph = _graph(rows[keep], cols[keep], dist[:, 1:].ravel()[keep], n)
    if parts is None:
        parts = connected_components(plain, directed=False)[0]
    if connected_components(graph[idx][:, idx], directed=False)[0] > parts:
        return plain, None
    return plain, (graph, clean)


def _graph(rows, cols, lengths, n):
    from scipy.sparse import csr_matrix

    g = csr_matrix((lengths, (rows, cols)), shape=(n, n))
    return g.maximum(g.T)
