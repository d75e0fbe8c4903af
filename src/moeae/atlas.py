"""The starting atlas: which chart each training point begins in, and where in that chart.

Both come from geodesic distances along the data (Isomap, Tenenbaum et al. 2000): shortest
paths in a k-nearest-neighbour graph, then classical MDS. Two things make that graph follow the
manifold rather than the ambient space:

- *tangent filtering* ({mod}`moeae.graph`): an edge is kept only when it runs along the local
  tangent space at both of its ends (estimated by PCA of each point's neighbours). Where a
  curve crosses itself (the figure-8's waist), plain k-NN edges jump between the branches and
  geodesics take the shortcut; filtered edges do not. Noisy points are smoothed until the
  filter holds; where it never does, the plain graph is used.
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

from .graph import neighbour_graph

__all__ = ["geodesic_embedding", "landmark_embedding", "align_coordinates",
           "initial_atlas", "choose_charts", "auto_charts", "clean_points", "fold_ratios",
           "worst_fold", "geodesic_distances", "classical_mds", "MAX_CHARTS"]

MAX_CHARTS = 16  # the most charts n_experts="auto" gives


def geodesic_distances(graph, indices=None) -> np.ndarray:
    """Shortest-path lengths of ``graph`` from every node (n, n), or from ``indices`` only
    (len(indices), n); unreachable pairs get the largest finite one."""
    from scipy.sparse.csgraph import shortest_path

    D = shortest_path(graph, method="D", directed=False, indices=indices)
    finite = np.isfinite(D)
    if not finite.all():
        D[~finite] = D[finite].max() if finite.any() else 0.0
    return D


def classical_mds(D: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Classical MDS of a distance matrix D (n, n): (n, n_components) and the eigenvalues.

    Above 400 points the top eigenvectors come from Lanczos iterations (ARPACK, from a fixed
    start vector) rather than a full decomposition (2000 points: ~0.3 s against ~1 s)."""
    from scipy.linalg import eigh
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    n = len(D)
    K = -0.5 * D**2
    K -= K.mean(0, keepdims=True)
    K -= K.mean(1, keepdims=True)
    m = min(n_components, n)
    w = V = None
    if n > 400 and m < n // 2:
        try:
            w, V = eigsh(K, k=m, which="LA", v0=np.linspace(1.0, 2.0, n), tol=1e-10)
            order = np.argsort(w)[::-1]
            w, V = w[order], V[:, order]
        except ArpackNoConvergence:
            w = None
    if w is None:
        w, V = eigh(K, subset_by_index=[n - m, n - 1])
        w, V = w[::-1], V[:, ::-1]
    return V * np.sqrt(np.clip(w, 0, None)), w


def geodesic_embedding(graph, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Classical MDS of the shortest-path distances of ``graph``: (n, n_components) and the
    eigenvalues (n_components,). Unreachable pairs get the largest finite distance."""
    return classical_mds(geodesic_distances(graph), n_components)


def landmark_embedding(graph, X: np.ndarray, n_components: int,
                       landmarks: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """:func:`geodesic_embedding` from shortest paths to ``landmarks`` points only (landmark
    MDS, de Silva & Tenenbaum 2004): the landmarks, spread by farthest-point sampling of X
    (n, d) from its first point, are placed by classical MDS of their own distances, every
    point by its distances to them. Exact for distances that are Euclidean in a flat space;
    a chart of 800 points costs a quarter of its all-pairs shortest paths. Returns
    (n, n_components) and the landmarks' eigenvalues (n_components,)."""
    n = len(X)
    if n <= landmarks:
        return geodesic_embedding(graph, n_components)
    picked = [0]
    near = ((X - X[0]) ** 2).sum(1)
    for _ in range(landmarks - 1):
        picked.append(int(near.argmax()))
        near = np.minimum(near, ((X - X[picked[-1]]) ** 2).sum(1))
    S = geodesic_distances(graph, picked) ** 2  # (L, n)
    L = S[:, picked]  # (L, L) squared distances between landmarks
    Y, w = classical_mds(np.sqrt(L), n_components)
    m = int((w > 1e-12 * max(float(w[0]), 1e-300)).sum())  # directions with a scale
    Z = np.zeros((n, n_components))
    # each point from its squared distances to the landmarks: -1/2 pinv(Y)^T (S_i - mean S_L)
    Z[:, :m] = -0.5 * (S - L.mean(1, keepdims=True)).T @ (Y[:, :m] / w[:m])
    return Z - Z.mean(0), w  # centred on all points, as geodesic_embedding


def align_coordinates(coords: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Each chart's coordinates turned to agree with where its encoder starts.

    coords (n, E, k), NaN where a point has none; start (n, E, k): each encoder's output at
    its initial weights. A chart's geodesic coordinates are defined up to an orthogonal map
    (an eigenvector's sign, a rotation or reflection of the plane); the one taken here
    (orthogonal Procrustes) is nearest to what the encoder already computes, so the warm start
    does not first have to turn the encoder over."""
    out = coords.copy()
    for e in range(coords.shape[1]):
        known = ~np.isnan(coords[:, e]).any(-1)
        if known.sum() < 2:
            continue
        C, Z = coords[known, e], start[known, e] - start[known, e].mean(0)
        u, _, vt = np.linalg.svd(C.T @ Z)
        out[known, e] = C @ (u @ vt)
    return out


def fold_ratios(D: np.ndarray, X: np.ndarray, eps: float) -> np.ndarray:
    """Ratio of geodesic to straight distance of every pair, ``(D_ij + eps) / (|x_i - x_j| +
    eps)``: (n, n). A chart holding a pair with a large ratio (points close in space, far apart
    along the manifold: a boundary next to a self-crossing, two turns of a coil) asks its
    encoder to be that steep; any piece of a circle up to half of it stays under pi/2.
    ``eps`` (about the spacing of neighbours) keeps graph detours of near points from
    counting."""
    sq = (X**2).sum(1)
    A = np.sqrt(np.clip(sq[:, None] + sq[None] - 2 * X @ X.T, 0, None)) + eps
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(A > 0, (D + eps) / np.where(A > 0, A, 1.0), 1.0)  # a point to itself: 1


def worst_fold(R: np.ndarray, labels: np.ndarray, n_charts: int) -> np.ndarray:
    """Per chart, the largest of the pair ratios R (:func:`fold_ratios`) within it."""
    return np.array([R[np.ix_(i, i)].max() if len(i) else 1.0
                     for i in (np.flatnonzero(labels == e) for e in range(n_charts))])


def _with_ranks(z: np.ndarray) -> np.ndarray:
    """A curve chart's geodesic coordinates (n,) -> the mean of those scaled to [-1, 1] and of
    their ranks spread over [-1, 1]: the same order, with half the code range shared by arc
    length and half by the points.

    By arc length alone the spiral (sampled evenly in its angle, so densely at its tight
    centre) gives its centre too little of the decoder's resolution. Seeds 0-13, paired: hard
    FVU median 3.3e-5 -> 9.7e-6 and the worst point closer (0.25-1.26 -> 0.19-0.68 away), each
    on 13 of 14 seeds. By rank alone the spiral gained as much, but on the figure-8 with
    arc-length codes 4 of 20 seeds rose above a speed CV of 0.05 (a chart's decoder hooked just
    past its last points), against 1 of 20 with the mean."""
    r = np.argsort(np.argsort(z, kind="stable"), kind="stable")
    ranks = 2.0 * r / max(len(z) - 1, 1) - 1.0
    return 0.5 * (ranks + z / max(float(np.abs(z).max()), 1e-12))


def _key(Xs: np.ndarray, k: int) -> tuple:
    """What a cache entry of these exact points (for charts of ``k`` coordinates) is found by."""
    import hashlib

    return (hashlib.sha256(np.ascontiguousarray(Xs).tobytes()).hexdigest(), Xs.shape, k)


def _geodesic_start(Xs: np.ndarray, k: int, cache: dict | None):
    """The graph of Xs, its clean points, their geodesic embedding (or Xs where the graph is
    degenerate) and geodesic distances (None there), from ``cache`` when it holds them for
    these exact points."""
    key = _key(Xs, k)
    if cache is not None and key in cache:
        return cache[key]
    graph, clean = neighbour_graph(Xs, max(2, min(10, len(Xs) // 4)), k)
    cl = np.flatnonzero(clean)
    emb = D = None
    if len(cl) >= 4:
        try:
            D = geodesic_distances(graph[cl][:, cl])
            emb, _ = classical_mds(D, min(k + 1, len(cl) - 2))
        except (ValueError, np.linalg.LinAlgError):
            emb, D = Xs[cl], None  # degenerate graph (duplicates, tiny data): ambient space
    if cache is not None:
        cache[key] = (graph, cl, emb, D)
    return graph, cl, emb, D


def _folds(Xs: np.ndarray, k: int, cache: dict | None) -> tuple[float, np.ndarray]:
    """The neighbour scale ``eps`` and the :func:`fold_ratios` of the clean points of Xs (whose
    geodesic distances :func:`_geodesic_start` found), from ``cache`` when it holds them."""
    key = ("folds", *_key(Xs, k))
    if cache is not None and key in cache:
        return cache[key]
    graph, cl, _, D = _geodesic_start(Xs, k, cache)
    eps = 2 * float(np.median(graph.data)) if graph.nnz else 0.0
    out = eps, fold_ratios(D, Xs[cl], eps)
    if cache is not None:
        cache[key] = out
    return out


def _centres(Xs: np.ndarray, k: int, n_charts: int, seed: int, candidates: int,
             cache: dict | None) -> np.ndarray:
    """:func:`_partition` of the clean points of Xs, from ``cache`` when these points were cut
    into as many pieces with the same seed before: ``n_experts="auto"`` checks the count it
    picks with the very pieces the starting atlas then trains (measured: 0.75 s of a 2000-point
    sphere's fit was that second partition)."""
    key = ("centres", *_key(Xs, k), n_charts, seed, candidates)
    if cache is not None and key in cache:
        return cache[key]
    _, _, emb, D = _geodesic_start(Xs, k, cache)
    _, R = _folds(Xs, k, cache)
    centres = _partition(emb, D, n_charts, seed, candidates, R)
    if cache is not None:
        cache[key] = centres
    return centres


def _medoids(D: np.ndarray, D2: np.ndarray, centres: np.ndarray,
             rounds: int = 3) -> np.ndarray:
    """Geodesic k-medoids from ``centres``: each point joins its nearest centre along the
    manifold (D: geodesic distances, D2 their squares), each centre moves to the point of its
    piece nearest (in squared distance) to the rest; ``rounds`` times."""
    for _ in range(rounds):
        labels = D[:, centres].argmin(1)
        onehot = np.eye(len(centres))[labels]  # (n, E)
        cost = np.where(onehot > 0, D2 @ onehot, np.inf)  # (n, E): to the rest of its piece
        new = np.where(np.isfinite(cost).any(0), cost.argmin(0), centres)
        if (new == centres).all():
            break
        centres = new
    return centres


def _partition(emb: np.ndarray, D: np.ndarray, n_charts: int, seed: int, candidates: int,
               R: np.ndarray, slack: float = 1.1) -> np.ndarray:
    """The centres (medoids, indices into X) of ``n_charts`` pieces of the manifold.

    Candidates: geodesic k-medoids (:func:`_medoids`) started from a k-means of the embedding
    and from ``candidates - 1`` farthest-point samplings (each from a random first point), so
    the cuts take every orientation. Kept: of those whose worst :func:`fold_ratios` within a
    piece is within ``slack`` times the lowest, the most compact (least squared geodesic
    distance to the centres)."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    D2 = D**2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        km = KMeans(n_clusters=n_charts, n_init=4, random_state=seed).fit(emb)
    starts = [np.array([int(np.argmin(((emb - c) ** 2).sum(1))) for c in km.cluster_centers_])]
    for _ in range(candidates - 1):
        picked = [int(rng.integers(len(D)))]
        for _ in range(n_charts - 1):
            picked.append(int(D[:, picked].min(1).argmax()))
        starts.append(np.array(picked))
    found = []
    for start in starts:
        centres = _medoids(D, D2, start)
        labels = D[:, centres].argmin(1)
        worst = float(worst_fold(R, labels, n_charts).max())
        spread = float(D2[np.arange(len(D)), centres[labels]].sum())
        found.append((worst, spread, centres))
    low = min(w for w, _, _ in found)
    return min((f for f in found if f[0] <= slack * low), key=lambda f: f[1])[2]


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
                  candidates: int = 24, cache: dict | None = None):
    """Starting charts (n, n_charts) and, with ``coordinates``, chart coordinates
    (n, n_charts, latent_dim), NaN where a point has none (off the chart, or a chart that
    closes on itself: its next geodesic eigenvalue is above ``max_extra`` times the last kept
    one, so flat coordinates would fold it). Otherwise the coordinates are None.

    ``overlap`` > 0 makes memberships soft within ``overlap`` x the chart spacing of a
    boundary, so neighbours learn to reach across it. Above ``max_points`` points the atlas is
    built on a subsample and every other point copies its nearest subsampled point.

    The pieces are the best of ``candidates`` geodesic partitions (``_partition``), judged
    by their worst :func:`fold_ratios`: a boundary next to a place where the manifold comes
    close to itself (the figure-8's waist) makes the encoders steep there. k-means of the
    embedding alone cut the figure-8 at its waist on most seeds, and those starts failed.

    ``cache``: a dict shared between calls on the same data (several expert counts or starts
    of one data set): the graph and its geodesic embedding, which do not depend on the number
    of charts or the seed, are then computed once.
    """
    from sklearn.neighbors import NearestNeighbors

    n = len(X)
    k = latent_dim
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
    Xs = X[sub]
    graph, cl, emb, D = _geodesic_start(Xs, k, cache)
    if n_charts == 1 or len(cl) < 4:
        labels = np.ones((len(cl), n_charts))
    else:
        c = min(n_charts, len(cl))
        if D is not None:  # pieces by geodesic distance to their centres
            centres = _centres(Xs, k, c, seed, candidates, cache)
            d2 = D[:, centres] ** 2  # (n_clean, n_charts)
            gap = np.sort(D[np.ix_(centres, centres)] ** 2, axis=1)[:, 1].mean()
        else:  # degenerate graph: k-means in the embedding
            from sklearn.cluster import KMeans

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                km = KMeans(n_clusters=c, n_init=4, random_state=seed).fit(emb)
            d2 = km.transform(emb) ** 2  # (n_clean, n_charts) squared distances to the centres
            cc = km.cluster_centers_
            gap = np.sort(((cc[:, None] - cc[None]) ** 2).sum(-1), axis=1)[:, 1].mean()
        if overlap > 0:
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
                z, w = landmark_embedding(graph[cl[idx]][:, cl[idx]], Xs[cl[idx]], k + 1)
            except (ValueError, np.linalg.LinAlgError):
                continue
            if w[k] > max_extra * w[k - 1]:
                continue
            z = z[:, :k] - z[:, :k].mean(0)
            if k == 1:  # a curve's chart: codes half by arc length, half by the data's share
                z = _with_ranks(z[:, 0])[:, None]
            coords[idx, e] = limit * z / max(float(np.abs(z).max()), 1e-12)
    # every point copies its nearest clean point's chart; coordinates only clean ones keep
    near = cl[NearestNeighbors(n_neighbors=1).fit(Xs[cl]).kneighbors(X)[1][:, 0]]
    own = np.full(n, -1)
    own[sub[cl]] = np.arange(len(cl))
    labels = labels[np.searchsorted(cl, near)]
    if coords is not None:
        coords = np.where((own >= 0)[:, None, None], coords[np.maximum(own, 0)], np.nan)
    return labels, coords


@_one_thread
def choose_charts(X: np.ndarray, latent_dim: int, seed: int = 0, max_charts: int = MAX_CHARTS,
                  max_fold: float = 4.5, max_flat: float = 2.5, max_points: int = 2000,
                  candidates: int = 24, cache: dict | None = None,
                  noise_slack: float = 1.3) -> tuple[int, list[dict]]:
    """The fewest charts that cover the data without strain: ``(n_charts, tried)``.

    For 1, 2, ... charts, the starting atlas's pieces (``_partition``) are checked:

    - *fold*: no piece holds a pair of points whose geodesic distance exceeds ``max_fold``
      times their straight distance (:func:`fold_ratios`: half a circle scores pi/2, three
      quarters 3.3, the spiral's 4 pieces, which train well, 4.05; a piece across the
      figure-8's waist about 20);
    - *flat*: each piece lies flat in ``latent_dim`` coordinates: its classical MDS keeps
      geodesic distances within a factor ``max_flat`` (a whole circle in one coordinate
      scores ~80, a sphere in two ~11, a Moebius band in two 4.4 and in three pieces 1.6).

    The first count that passes both is returned. Where none does (noise: a unit circle with
    noise 0.05 scores 3.0-3.6 at every count from 2 to 16, so it took 16 charts, 6 of them
    used, and reconstructed clean points 3.7x worse than with 2), the first count that passes
    *fold* with *flat* within ``noise_slack`` times the lowest *flat* of any count; else
    ``max_charts``. ``tried`` lists, per count, ``n_charts`` and its worst ``fold`` and
    ``flat`` ratios. Costs one neighbour graph and its geodesic distances, then about one
    starting atlas per count tried."""
    n = len(X)
    k = latent_dim
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
    Xs = np.asarray(X[sub])
    _, cl, _, D = _geodesic_start(Xs, k, cache)
    if D is None or len(cl) < 2 * (k + 3):
        return 1, []
    eps, R = _folds(Xs, k, cache)
    tried = []
    for c in range(1, max_charts + 1):
        if c == 1:
            labels = np.zeros(len(cl), dtype=int)
        else:
            centres = _centres(Xs, k, c, seed, candidates, cache)
            labels = D[:, centres].argmin(1)
        fold = float(worst_fold(R, labels, c).max())
        flat = 1.0
        for e in range(c):
            idx = np.flatnonzero(labels == e)
            if len(idx) >= k + 3:
                De = D[np.ix_(idx, idx)]
                z, _ = classical_mds(De, k)
                Z = np.sqrt(((z[:, None] - z[None]) ** 2).sum(-1))
                flat = max(flat, float(((De + eps) / (Z + eps)).max()))
        tried.append({"n_charts": c, "fold": fold, "flat": flat})
        if fold <= max_fold and flat <= max_flat:
            return c, tried
    # no count lies flat: noise thickens every piece (or the data are no latent_dim-manifold);
    # the flattest any count gets is then the floor, and the fewest charts near it are kept
    floor = noise_slack * min(t["flat"] for t in tried)
    return next((int(t["n_charts"]) for t in tried
                 if t["fold"] <= max_fold and t["flat"] <= floor), max_charts), tried


def clean_points(X: np.ndarray, latent_dim: int, cache: dict | None = None) -> np.ndarray:
    """Which points of X (at most ``initial_atlas``'s ``max_points``, as it sees them) have a
    neighbourhood of one sheet: bool (n,). Points near a self-crossing (the figure-8's waist)
    are False; all are True where the plain neighbour graph is used (noise)."""
    _, cl, _, _ = _geodesic_start(X, latent_dim, cache)
    mask = np.zeros(len(X), dtype=bool)
    mask[cl] = True
    return mask


def auto_charts(X, latent_dim: int, seed: int, sample: int = 2000,
                cache: dict | None = None) -> tuple[int, list[dict]]:
    """:func:`choose_charts` on X (an array or memory map, (n, d)), or on a seeded sample of
    ``sample`` of its points, in float32 as the starting atlas sees them (so ``cache`` then
    serves both): what ``n_experts="auto"`` and ``moeae train --experts auto`` use."""
    n = len(X)
    idx = np.arange(n) if n <= sample else np.sort(
        np.random.default_rng(seed).choice(n, sample, replace=False))
    return choose_charts(np.asarray(X[idx], dtype=np.float32), latent_dim, seed=seed,
                         cache=cache)
