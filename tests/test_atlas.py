"""The starting atlas: a graph along the manifold, geodesic charts, unfolded coordinates."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from scipy.stats import spearmanr
from sklearn.neighbors import kneighbors_graph

from moeae import datasets as ds
from moeae.atlas import (
    align_coordinates,
    geodesic_embedding,
    initial_atlas,
    landmark_embedding,
)
from moeae.graph import neighbour_graph
from moeae.metrics import chart_shape


def cross_branch_edges(graph, t, period=None, max_dt=0.3) -> int:
    g = graph.tocoo()
    dt = np.abs(t[g.row] - t[g.col])
    if period is not None:
        dt = np.minimum(dt, period - dt)
    return int((dt > max_dt).sum())


def test_figure8_graph_does_not_cross_at_the_waist():
    for seed in range(3):
        X, t = ds.make_figure8(1000, random_state=seed)
        plain = kneighbors_graph(X, 10)
        assert cross_branch_edges(plain, t, 2 * np.pi) > 0  # the shortcut the filter removes
        graph, clean = neighbour_graph(X, 10, 1)
        assert cross_branch_edges(graph, t, 2 * np.pi) == 0
        assert 0.97 * len(X) <= clean.sum() < len(X)  # a few points at the crossing left out
        assert connected_components(graph[clean][:, clean], directed=False)[0] == 1


def _noisy_figure8(noise=0.01, seed=0):
    X, t = ds.make_figure8(1000, random_state=seed)
    return X + noise * np.random.default_rng(seed + 1000).standard_normal(X.shape), t


def test_a_noisy_figure8_graph_is_filtered_on_smoothed_points():
    """Noise 0.01 (points 0.006 apart along the curve): no tangent is found among a point's 10
    nearest, and the plain graph crosses at the waist; smoothed, the filter holds."""
    X, t = _noisy_figure8()
    graph, clean = neighbour_graph(X, 10, 1, smoothing=0)
    assert clean.all() and cross_branch_edges(graph, t, 2 * np.pi) > 0
    graph, clean = neighbour_graph(X, 10, 1)
    assert cross_branch_edges(graph, t, 2 * np.pi) == 0
    assert 0.8 * len(X) <= clean.sum() < len(X)
    waist = np.linalg.norm(X, axis=1) < 0.05
    assert waist.sum() > 10 and not clean[waist].any() and clean[~waist].mean() > 0.8
    assert connected_components(graph[clean][:, clean], directed=False)[0] == 1
    # an independent computation: the edges are as long as between the points smoothed by
    # some number of steps, each the mean of the point's 10 nearest and itself
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=11).fit(X).kneighbors(X)[1]
    g = graph.tocoo()
    Y, matches = X, []
    for _ in range(10):
        Y = np.stack([Y[row].mean(0) for row in nn])
        matches.append(np.allclose(g.data, np.linalg.norm(Y[g.row] - Y[g.col], axis=1)))
    assert sum(matches) == 1


def test_a_smoothed_graph_has_no_more_pieces_than_the_data():
    """Smoothing pulls a noisy spiral's sparse outer turns apart: counted against the smoothed
    points' own plain graph, its graph came in 5 pieces (and the spiral got 8 charts)."""
    X, _ = ds.make_spiral(1000, random_state=0)
    X = X + 0.1 * np.random.default_rng(1000).standard_normal(X.shape)
    assert connected_components(kneighbors_graph(X, 10), directed=False)[0] == 1
    graph, clean = neighbour_graph(X, 10, 1)
    assert 0.8 * len(X) <= clean.sum() < len(X)  # filtered, on smoothed points
    assert connected_components(graph[clean][:, clean], directed=False)[0] == 1


def test_small_data_are_never_smoothed_into_a_point():
    """Smoothing averages at most a tenth of the points: 30 points averaged over 30 neighbours
    became one point, whose graph had edges of length 0 (the fit then diverged)."""
    X = np.random.default_rng(0).uniform(size=(30, 3))
    graph, clean = neighbour_graph(X, 7, 1)
    plain = kneighbors_graph(X, 7, mode="distance")
    assert clean.all() and (graph != plain.maximum(plain.T)).nnz == 0


def test_clean_data_are_never_smoothed():
    X, _ = ds.make_figure8(1000, random_state=0)
    a, clean_a = neighbour_graph(X, 10, 1)
    b, clean_b = neighbour_graph(X, 10, 1, smoothing=0)
    assert (a != b).nnz == 0 and (clean_a == clean_b).all()


def test_repeated_float32_points_build_the_graph_without_a_warning():
    """Every point twice, in float32 (what a fit hands the atlas): edges of length 0 were
    divided by 1e-300, which is 0 in float32 ("invalid value encountered in divide"). The
    graph is the one of the points without their copies."""
    X, _ = ds.make_figure8(500, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph, clean = neighbour_graph(np.repeat(X, 2, 0).astype(np.float32), 10, 1)
    assert clean.mean() > 0.8 and graph.nnz > 0
    assert connected_components(graph[clean][:, clean], directed=False)[0] == 1
    assert np.isfinite(graph.data).all() and graph.data.min() > 0  # no edge to a copy


def test_a_noisy_figure8_gets_its_two_charts():
    from moeae.atlas import auto_charts

    assert auto_charts(_noisy_figure8(0.01)[0], 1, 0)[0] == 2  # the plain graph gave 15,
    assert auto_charts(_noisy_figure8(0.02)[0], 1, 0)[0] == 2  # 10
    assert auto_charts(_noisy_figure8(0.05)[0], 1, 0)[0] == 2  # and 13 (smoothed over 30)


def test_noisy_or_high_dimensional_data_keeps_the_plain_graph():
    X, _ = ds.load_digits()
    graph, clean = neighbour_graph(X[:500], 10, 2)
    assert clean.all()
    plain = kneighbors_graph(X[:500], 10, mode="distance")
    plain = plain.maximum(plain.T)
    assert (graph != plain).nnz == 0


def test_geodesic_embedding_of_a_path_is_its_arc_length():
    rng = np.random.default_rng(0)
    pos = np.cumsum(rng.uniform(0.5, 2.0, 30))  # points on a line, uneven spacing
    i = np.arange(29)
    graph = csr_matrix((np.diff(pos), (i, i + 1)), shape=(30, 30))
    z, w = geodesic_embedding(graph, 2)
    expected = pos - pos.mean()
    z0 = z[:, 0] * np.sign(z[0, 0] * expected[0])
    np.testing.assert_allclose(z0, expected, atol=1e-8)
    assert abs(w[1]) < 1e-8 * w[0]  # a path is flat: no second dimension


def test_landmark_embedding_of_a_flat_piece_matches_all_pairs():
    """Landmark MDS places every point from its distances to 200 landmarks: on a path it is
    the arc length exactly, on a flat strip of a plane within 2% of all-pairs MDS."""
    rng = np.random.default_rng(0)
    pos = np.sort(rng.uniform(0, 50, 600))  # a path with uneven spacing
    i = np.arange(599)
    path = csr_matrix((np.diff(pos), (i, i + 1)), shape=(600, 600))
    z, w = landmark_embedding(path, pos[:, None], 2)
    expected = pos - pos.mean()
    np.testing.assert_allclose(z[:, 0] * np.sign(z[0, 0] * expected[0]), expected, atol=1e-6)
    assert abs(w[1]) < 1e-8 * w[0]
    X = np.c_[rng.uniform(0, 4, 800), rng.uniform(0, 1, 800), np.zeros(800)]
    graph, _ = neighbour_graph(X, 10, 2)
    a, wa = geodesic_embedding(graph, 2)
    b, wb = landmark_embedding(graph, X, 2)
    a, b = a - a.mean(0), b - b.mean(0)
    u, _, vt = np.linalg.svd(b.T @ a)  # the best rotation (or reflection) of b onto a
    assert np.linalg.norm(b @ u @ vt - a) < 0.02 * np.linalg.norm(a)
    np.testing.assert_allclose(wb / wb[0], wa / wa[0], atol=0.02)


def test_coordinates_turn_to_where_the_encoders_start():
    """Each chart's coordinates take the orthogonal map (sign, rotation, reflection) nearest
    to the encoder's starting output; lengths, unknown points and other charts are kept."""
    rng = np.random.default_rng(0)
    C = np.full((50, 3, 2), np.nan)
    C[:30, 0] = rng.normal(size=(30, 2))
    C[20:, 1] = rng.normal(size=(30, 2))  # chart 2 has no coordinates
    turn = np.array([[0.0, 1.0], [1.0, 0.0]])  # a reflection
    angle = 0.7
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    start = np.zeros((50, 3, 2))
    start[:, 0] = 0.01 * np.nan_to_num(C[:, 0]) @ turn + 0.3  # small, shifted, reflected
    start[:, 1] = 0.01 * np.nan_to_num(C[:, 1]) @ rot
    out = align_coordinates(C, start + 1e-5 * rng.normal(size=start.shape))
    np.testing.assert_allclose(out[:30, 0], C[:30, 0] @ turn, atol=1e-3)
    np.testing.assert_allclose(out[20:, 1], C[20:, 1] @ rot, atol=1e-3)
    assert np.isnan(out[30:, 0]).all() and np.isnan(out[:20, 1]).all() and np.isnan(out[:, 2]).all()
    line = np.linspace(-1, 1, 9)[:, None, None]
    np.testing.assert_allclose(align_coordinates(line, -line), -line)  # k = 1: the sign


def test_spiral_charts_are_arcs_with_monotone_coordinates():
    X, t = ds.make_spiral(1000, random_state=0)
    labels, coords = initial_atlas(X, 4, 1, seed=0, coordinates=True)
    chart = labels.argmax(1)
    assert chart_shape(chart, np.zeros((1000, 1)), t, closed=False)["max_arcs_per_chart"] == 1
    for e in range(4):
        on = chart == e
        z = coords[on, e, 0]
        assert np.isfinite(z).all() and np.abs(z).max() <= 0.8 + 1e-9
        assert abs(spearmanr(z, t[on]).statistic) > 0.999  # unrolled, not folded


def test_curve_coordinates_share_the_codes_half_by_arc_length_and_half_by_the_points():
    from moeae.atlas import _with_ranks

    even = np.linspace(-3.0, 3.0, 7)  # evenly spaced: ranks and arc length agree
    assert np.allclose(_with_ranks(even), even / 3)
    z = np.array([-1.0, 0.0, 9.0])  # one point far out: it gets less than its arc length
    assert np.allclose(_with_ranks(z), [(-1 - 1 / 9) / 2, 0.0, 1.0])
    # on the spiral (sampled evenly in its angle), the chart holding the centre gives its
    # innermost stretch (t < 2) the mean of its share of arc length and its share of points
    X, t = ds.make_spiral(1000, random_state=0)
    labels, coords = initial_atlas(X, 4, 1, seed=0, coordinates=True)
    e = int(labels[np.argmin(t)].argmax())
    on = (labels.argmax(1) == e) & np.isfinite(coords[:, e, 0])
    z, tt = coords[on, e, 0], t[on]
    s = 0.5 * (tt * np.sqrt(1 + tt**2) + np.arcsinh(tt))  # the spiral's arc length from 0
    inner = tt < 2
    code_share = np.ptp(z[inner]) / np.ptp(z)
    arc_share, point_share = np.ptp(s[inner]) / np.ptp(s), inner.mean()
    assert code_share > 1.5 * arc_share, (code_share, arc_share)
    assert code_share == pytest.approx((arc_share + point_share) / 2, abs=0.03)


def test_a_chart_that_closes_on_itself_gets_no_coordinates():
    X, t = ds.make_circle(400, random_state=0)
    _, coords = initial_atlas(X, 1, 1, seed=0, coordinates=True)
    assert np.isnan(coords).all()  # a flat coordinate would fold the loop
    arc = t < np.pi  # half the circle is an arc: it unrolls
    _, coords = initial_atlas(X[arc], 1, 1, seed=0, coordinates=True)
    assert np.isfinite(coords).all()
    assert abs(spearmanr(coords[:, 0, 0], t[arc]).statistic) > 0.999


def test_soft_overlap_and_subsampling_cover_every_point():
    X, _ = ds.make_sphere(3000, random_state=0)
    labels, coords = initial_atlas(X, 4, 2, seed=0, overlap=0.3, coordinates=True,
                                   max_points=1000)
    assert labels.shape == (3000, 4) and coords.shape == (3000, 4, 2)
    np.testing.assert_allclose(labels.sum(1), 1.0)
    assert ((labels > 0.05) & (labels < 0.95)).any()  # soft near boundaries
    known = np.isfinite(coords).all(-1).any(-1)
    assert 900 <= known.sum() <= 1000  # coordinates only for the subsample's clean points
    labels2, _ = initial_atlas(X, 4, 2, seed=0, overlap=0.3, max_points=1000)
    np.testing.assert_array_equal(labels, labels2)  # deterministic for a seed


def test_a_shared_cache_changes_nothing():
    X, _ = ds.make_spiral(600, random_state=2)
    cache: dict = {}
    for E, seed in [(2, 0), (4, 1), (4, 2)]:
        cached = initial_atlas(X, E, 1, seed, overlap=0.3, coordinates=True, cache=cache)
        alone = initial_atlas(X, E, 1, seed, overlap=0.3, coordinates=True)
        np.testing.assert_array_equal(cached[0], alone[0])
        np.testing.assert_array_equal(cached[1], alone[1])
    # one data set: one graph and embedding, one set of fold ratios, pieces per count and seed
    kinds = sorted(k[0] if k[0] in ("folds", "centres") else "graph" for k in cache)
    assert kinds == ["centres"] * 3 + ["folds", "graph"]
    again = initial_atlas(X, 4, 1, 2, overlap=0.3, coordinates=True, cache=cache)
    np.testing.assert_array_equal(again[0], cached[0])  # the pieces from the cache
    assert len(cache) == 5


def _waist_distance(t_cuts):
    """Distance of the nearest chart boundary to the figure-8's waist (t = 0, pi)."""
    d = np.abs(((np.asarray(t_cuts) + np.pi / 2) % np.pi) - np.pi / 2)
    return float(d.min())


def test_figure8_charts_are_not_cut_at_the_waist():
    """Plain k-means of the embedding cut the two lobes apart (boundaries at the waist) on
    most samples; the chosen partition puts both boundaries far from it (pi/2 is ideal)."""
    from moeae.atlas import fold_ratios, worst_fold
    for seed in range(6):
        X, t = ds.make_figure8(1000, random_state=seed)
        labels, _ = initial_atlas(X, 2, 1, seed=seed)
        chart = labels.argmax(1)
        graph, clean = neighbour_graph(X, 10, 1)
        c = np.flatnonzero(clean)
        o = c[np.argsort(t[c])]  # clean points along the curve
        cuts = t[o][np.flatnonzero(np.diff(chart[o]))]
        assert _waist_distance(cuts) > 1.0, (seed, cuts)
        from moeae.atlas import geodesic_distances
        D = geodesic_distances(graph[c][:, c])
        R = fold_ratios(D, X[c], 0.02)
        assert worst_fold(R, chart[c], 2).max() < 2.0  # each piece: about half a loop
        lobes = (t[c] > np.pi).astype(int)  # the cut the old atlas made
        assert worst_fold(R, lobes, 2).max() > 10.0  # both branches meet inside a lobe


def test_fold_ratio_of_arcs_is_arc_over_chord():
    from moeae.atlas import fold_ratios, worst_fold
    t = np.linspace(0, 1.5 * np.pi, 301)  # three quarters of a circle
    X = np.c_[np.cos(t), np.sin(t)]
    D = np.abs(t[:, None] - t[None])  # exact geodesic distances along the arc
    R = fold_ratios(D, X, 0.0)
    expected = 1.5 * np.pi / np.sqrt(2)  # arc length over chord between the ends
    np.testing.assert_allclose(worst_fold(R, np.zeros(301, int), 1), [expected], rtol=1e-9)
    halves = (t > 0.75 * np.pi).astype(int)
    np.testing.assert_allclose(worst_fold(R, halves, 2).max(),
                               0.75 * np.pi / (2 * np.sin(0.375 * np.pi)), rtol=1e-3)


def test_choose_charts_fewest_that_neither_close_nor_fold():
    from moeae.atlas import choose_charts
    X, _ = ds.make_circle(600, random_state=0)
    E, tried = choose_charts(X, 1, seed=0)
    assert E == 2 and tried[0]["flat"] > 10 and tried[1]["flat"] < 1.5  # one chart folds
    X, _ = ds.make_figure8(800, random_state=1)
    E, tried = choose_charts(X, 1, seed=1)
    assert E == 2 and tried[0]["fold"] > 10  # one chart holds the crossing
    t = np.linspace(0, np.pi / 2, 400)  # a quarter circle: one chart suffices
    E, tried = choose_charts(np.c_[np.cos(t), np.sin(t)], 1)
    assert E == 1 and len(tried) == 1


def test_choose_charts_on_bands_and_coils():
    """A Moebius band does not lie flat in one or two pieces (it is not orientable and it
    closes); a coil whose turns nearly touch needs pieces shorter than a turn."""
    from moeae.atlas import choose_charts
    X, _ = ds.make_moebius(1500, half_twists=1, random_state=0)
    E, tried = choose_charts(X, 2, seed=0)
    assert E == 3 and tried[0]["flat"] > 3 and tried[1]["flat"] > 2.5
    X, _ = ds.make_helix(1000, turns=3, pitch=0.3, random_state=0)
    E, tried = choose_charts(X, 1, seed=0)
    assert E >= 4 and tried[E - 2]["fold"] > 10  # fewer pieces hold two neighbouring turns


def test_choose_charts_on_noisy_data_keeps_the_fewest_near_the_noise_floor():
    """Noise 0.05 on a unit circle thickens every piece: no count lies flat within 2.5, so
    the fewest charts whose flatness is within 1.3x of the flattest count's are kept (16
    before, 6 of them used, and clean points reconstructed 3.7x worse than with 2)."""
    from moeae.atlas import choose_charts
    X, _ = ds.make_circle(1000, random_state=0)
    X = X + 0.05 * np.random.default_rng(7).standard_normal(X.shape)
    E, tried = choose_charts(X, 1, seed=0)
    flats = [t["flat"] for t in tried]
    assert len(tried) == 16 and min(flats) > 2.5  # every count tried, none flat
    assert E == next(t["n_charts"] for t in tried
                     if t["fold"] <= 4.5 and t["flat"] <= 1.3 * min(flats))
    assert E == 2
    E_strict, _ = choose_charts(X, 1, seed=0, noise_slack=1.0)
    assert E_strict == flats.index(min(flats)) + 1  # slack 1: the flattest count itself
