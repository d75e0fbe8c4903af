"""The starting atlas: which chart each training point begins in, and where in that chart.

Both come from geodesic distances along the data (Isomap, Tenenbaum et al. 2000): shortest
paths in a k-nearest-neighbour graph, then classical MDS. Two things make that graph follow the
manifold rather than the ambient space:

- *tangent filtering*: an edge is kept only when it runs along the local tangent space at
  both of its ends (estimated by PCA of each point's neighbours). Where a curve crosses itself
  (the figure-8's waist), plain k-NN edges jump between the branches and geodesics take the
  shortcut; filtered edges do not. If filtering would split the graph, the plain graph is
  used (noisy or high-dimensional data, where tangents are poorly estimated).
- *charts from lengths*: k-means on the embedding cuts the manifold into contiguous pieces of
  similar length (a spectral embedding balances point counts instead: on the spiral its outer
  chart held 60% of the length and folded).

Each chart then gets coordinates of its own: the geodesic embedding of its own piece of the
graph, scaled into the encoder's range. An arc is unrolled at constant speed and a patch is
flattened without folds, so the encoder starts from an unfolded parametrisation.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np

__all__ = ["neighbour_graph", "geodesic_embedding", "initial_atlas"]


def neighbour_graph(X: np.ndarray, n_neighbors: int, dim: int, max_ambiguity: float = 0.2,
                    min_alignment: float = 0.9, reach: int = 3) -> tuple:
    """A graph along the manifold: ``(graph, clean)``, a symmetric sparse (n, n) matrix of edge
    lengths and a mask of the points that have edges.

    Each point's tangent space is the top ``dim`` principal directions of its ``n_neighbors``
    nearest neighbours. A point is *ambiguous* when the next singular value exceeds
    ``max_ambiguity`` times the last tangent one (two branches through a crossing, or noise)
    and gets no edges. Clean points connect to those of their ``reach * n_neighbors`` nearest
    clean points that lie along the tangent space at both ends (cosine >= ``min_alignment``),
    which bridges the gap the ambiguous points leave along each branch but not across.
    When too few points are clean (< 80%) or the filtered graph has more components than the
    plain k-NN graph, the plain graph is returned with every point clean.
    """
    from scipy.sparse.csgraph import connected_components
    from sklearn.neighbors import NearestNeighbors

    n = len(X)
    k = min(n_neighbors, n - 1)
    dist, nn = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X)
    plain = _graph(np.repeat(np.arange(n), k), nn[:, 1:].ravel(), dist[:, 1:].ravel(), n)
    everyone = np.ones(n, dtype=bool)
    if dim >= X.shape[1] or k <= dim + 1:
        return plain, everyone
    nb = X[nn[:, 1:]] - X[nn[:, 1:]].mean(1, keepdims=True)  # (n, k, d)
    _, sv, vt = np.linalg.svd(nb, full_matrices=False)
    clean = sv[:, dim] <= max_ambiguity * sv[:, dim - 1]
    if clean.sum() < 0.8 * n:
        return plain, everyone
    tangent = vt[:, :dim]  # (n, dim, d)
    idx = np.flatnonzero(clean)
    kk = min(reach * k, len(idx) - 1)
    dist, nn = NearestNeighbors(n_neighbors=kk + 1).fit(X[idx]).kneighbors(X[idx])
    rows, cols = np.repeat(idx, kk), idx[nn[:, 1:].ravel()]
    v = X[cols] - X[rows]
    norm = np.linalg.norm(v, axis=1).clip(1e-300)
    along_i = np.linalg.norm(np.einsum("ekd,ed->ek", tangent[rows], v), axis=1) / norm
    along_j = np.linalg.norm(np.einsum("ekd,ed->ek", tangent[cols], v), axis=1) / norm
    keep = (along_i >= min_alignment) & (along_j >= min_alignment)
    graph = _graph(rows[keep], cols[keep], dist[:, 1:].ravel()[keep], n)
    parts = connected_components(graph[idx][:, idx], directed=False)[0]
    if parts > connected_components(plain, directed=False)[0]:
        return plain, everyone
    return graph, clean


def _graph(rows, cols, lengths, n):
    from scipy.sparse import csr_matrix

    g = csr_matrix((lengths, (rows, cols)), shape=(n, n))
    return g.maximum(g.T)


def geodesic_embedding(graph, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Classical MDS of the shortest-path distances of ``graph``: (n, n_components) and the
    eigenvalues (n_components,). Unreachable pairs get the largest finite distance."""
    from scipy.linalg import eigh
    from scipy.sparse.csgraph import shortest_path

    D = shortest_path(graph, method="D", directed=False)
    finite = np.isfinite(D)
    if not finite.all():
        D[~finite] = D[finite].max() if finite.any() else 0.0
    n = len(D)
    K = -0.5 * D**2
    K -= K.mean(0, keepdims=True)
    K -= K.mean(1, keepdims=True)
    m = min(n_components, n)
    w, V = eigh(K, subset_by_index=[n - m, n - 1])
    w, V = w[::-1], V[:, ::-1]
    return V * np.sqrt(np.clip(w, 0, None)), w


def _geodesic_start(Xs: np.ndarray, k: int, cache: dict | None):
    """The graph of Xs, its clean points and their geodesic embedding (or Xs where the graph
    is degenerate), from ``cache`` when it holds them for these exact points."""
    import hashlib

    key = (hashlib.sha256(np.ascontiguousarray(Xs).tobytes()).hexdigest(), Xs.shape, k)
    if cache is not None and key in cache:
        return cache[key]
    graph, clean = neighbour_graph(Xs, max(2, min(10, len(Xs) // 4)), k)
    cl = np.flatnonzero(clean)
    emb = None
    if len(cl) >= 4:
        try:
            emb, _ = geodesic_embedding(graph[cl][:, cl], min(k + 1, len(cl) - 2))
        except (ValueError, np.linalg.LinAlgError):
            emb = Xs[cl]  # degenerate graph (duplicates, tiny data): cluster in ambient space
    if cache is not None:
        cache[key] = (graph, cl, emb)
    return graph, cl, emb


def _one_thread(fn):
    """Run ``fn`` with one thread in numpy/scipy's BLAS and scikit-learn's OpenMP.

    The atlas's bits then do not depend on the machine's thread count (``torchrun`` sets
    ``OMP_NUM_THREADS=1`` in its processes, a plain process uses every core: the eigenvectors
    differed in the last bits), and two BLAS threads collapse on a busy machine as torch's do
    (a figure-8 atlas with 4 charts: 3.5-7.5 s with two threads, 2.0-2.1 s with one)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        import scipy.linalg  # noqa: F401 - a limit applies to the libraries loaded before it
        import sklearn.cluster  # noqa: F401
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

        with threadpool_limits(limits=1):
            return fn(*args, **kwargs)
    return run


@_one_thread
def initial_atlas(X: np.ndarray, n_charts: int, latent_dim: int, seed: int,
                  overlap: float = 0.0, coordinates: bool = False, max_points: int = 2000,
                  min_weight: float = 0.05, limit: float = 0.8, max_extra: float = 0.25,
                  cache: dict | None = None):
    """Starting charts (n, n_charts) and, with ``coordinates``, chart coordinates
    (n, n_charts, latent_dim), NaN where a point has none (off the chart, or a chart that
    closes on itself: its next geodesic eigenvalue is above ``max_extra`` times the last kept
    one, so flat coordinates would fold it). Otherwise the coordinates are None.

    ``overlap`` > 0 makes memberships soft within ``overlap`` x the chart spacing of a
    boundary, so neighbours learn to reach across it. Above ``max_points`` points the atlas is
    built on a subsample and every other point copies its nearest subsampled point.

    ``cache``: a dict shared between calls on the same data (several expert counts or starts
    of one data set): the graph and its geodesic embedding, which do not depend on the number
    of charts or the seed, are then computed once.
    """
    from sklearn.cluster import KMeans
    from sklearn.neighbors import NearestNeighbors

    n = len(X)
    k = latent_dim
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
    Xs = X[sub]
    graph, cl, emb = _geodesic_start(Xs, k, cache)
    if n_charts == 1 or len(cl) < 4:
        labels = np.ones((len(cl), n_charts))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            km = KMeans(n_clusters=min(n_charts, len(cl)), n_init=4, random_state=seed).fit(emb)
        d2 = km.transform(emb) ** 2  # (n_clean, n_charts) squared distances to the centres
        if overlap > 0:
            c = km.cluster_centers_
            gap = np.sort(((c[:, None] - c[None]) ** 2).sum(-1), axis=1)[:, 1].mean()
            z = -(d2 - d2.min(1, keepdims=True)) / (overlap * gap)
            labels = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        else:
            labels = np.eye(n_charts)[d2.argmin(1)]
        labels = np.pad(labels, ((0, 0), (0, n_charts - labels.shape[1])))
    coords = None
    if coordinates:
        coords = np.full((len(cl), n_charts, k), np.nan)
        for e in range(n_charts):
            idx = np.flatnonzero(labels[:, e] >= min_weight)
            if len(idx) < k + 3:
                continue
            try:
                z, w = geodesic_embedding(graph[cl[idx]][:, cl[idx]], k + 1)
            except (ValueError, np.linalg.LinAlgError):
                continue
            if w[k] > max_extra * w[k - 1]:
                continue
            z = z[:, :k] - z[:, :k].mean(0)
            coords[idx, e] = limit * z / max(float(np.abs(z).max()), 1e-12)
    # every point copies its nearest clean point's chart; coordinates only clean ones keep
    near = cl[NearestNeighbors(n_neighbors=1).fit(Xs[cl]).kneighbors(X)[1][:, 0]]
    own = np.full(n, -1)
    own[sub[cl]] = np.arange(len(cl))
    labels = labels[np.searchsorted(cl, near)]
    if coords is not None:
        coords = np.where((own >= 0)[:, None, None], coords[np.maximum(own, 0)], np.nan)
    return labels, coords
