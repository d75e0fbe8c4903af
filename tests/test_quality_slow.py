"""Quality of the default recipe at its default budget (minutes: run with ``pytest -m slow``).

The thresholds are the ones the project promises in its README; each fit is seeded.
"""

import numpy as np
import pytest
from sklearn.decomposition import PCA

from moeae import MoEAutoencoder
from moeae import datasets as ds
from moeae.metrics import chart_shape

pytestmark = pytest.mark.slow


def _ellipse(n, random_state=None, grid=False):
    rng = np.random.default_rng(random_state)
    t = np.linspace(0, 2 * np.pi, n) if grid else rng.uniform(0, 2 * np.pi, n)
    return np.c_[3 * np.cos(t), np.sin(t)], t


@pytest.mark.parametrize("make, experts, limit", [
    (ds.make_circle, 2, 1e-4),
    (ds.make_trefoil, 4, 5e-4),
    (_ellipse, 4, 5e-4),
])
def test_curves_hard_fvu(make, experts, limit):
    X, _ = make(1000, random_state=0)
    X_te, _ = make(1000, grid=True)
    est = MoEAutoencoder(n_experts=experts, random_state=0).fit(X)
    assert est.reconstruction_error(X_te, "hard") <= limit


@pytest.mark.parametrize("make, experts, closed", [(ds.make_figure8, 2, True),
                                                    (ds.make_spiral, 4, False)])
@pytest.mark.parametrize("seed", [0, 1])
def test_default_settings_give_clean_hard_charts(make, experts, closed, seed):
    X, _ = make(1000, random_state=seed)
    X_te, t_te = make(1000, grid=True)
    est = MoEAutoencoder(n_experts=experts, random_state=seed).fit(X)
    assert est.reconstruction_error(X_te, "hard") <= 1e-4
    codes = est.transform(X_te)
    shape = chart_shape(codes[:, 0].astype(int), codes[:, 1:], t_te, closed)
    # known gaps: near the figure-8's crossing the router can interleave the two charts, and
    # since experts learn a margin around their charts (expert_overlap) an island of one chart
    # can sit where both fit (figure-8 seed 1 in session 5: 4 arcs, a 0.25-long island with
    # FVU 1.9e-5 and z jumps of 0.014; spiral seeds 0 and 1 in session 6: 2 arcs, FVU 1.2e-5
    # and 2.7e-5, z jumps 0.014 and 0.010; docs/recipes.md)
    assert shape["max_arcs_per_chart"] <= (4 if closed else 2)
    assert shape["max_z_jump"] <= 0.25


def _lissajous(n, random_state=None, grid=False):
    # a closed curve with crossings, never used while tuning
    rng = np.random.default_rng(random_state)
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) if grid else rng.uniform(0, 2 * np.pi, n)
    return np.c_[np.sin(3 * t), np.sin(2 * t)], t


@pytest.mark.xfail(reason="known gap: a curve with many crossings (a 3:2 Lissajous figure) and 4 "
                          "charts: seeds 0-5 gave 6.4e-5 to 1.9e-3 with 6-8 arcs in a chart "
                          "(session 10; seed 0 passes, 9.8e-5)", strict=False)
def test_untuned_curve_with_crossings():
    X, _ = _lissajous(1000, random_state=0)
    X_te, _ = _lissajous(1000, grid=True)
    est = MoEAutoencoder(n_experts=4, random_state=0).fit(X)
    assert est.reconstruction_error(X_te, "hard") <= 5e-4


def test_untuned_curve_with_cusps_fits_within_the_goal():
    """An epicycloid with 3 cusps: the neighbour graph gives 2 charts, which can miss the cusps
    the same way along the chart (2 charts fixed, seeds 0-7, session 14: hard FVU 5.2e-5 to
    3.0e-4, 4 of 8 within 1e-4). Seed 0's underfit (training FVU 1.4e-4, residuals as trained
    agreeing 0.86), so the atlas trains a third chart and fits (new points 7.3e-5; session 13,
    2 charts: 5.2e-5). Session 15, placed units held: the graph's 2 charts fit (6.3e-5).
    Session 16, arc-length codes: the 2 charts tear at a cusp (jump ratio 4.9), 3 fit
    (3.2e-5)."""
    def epicycloid(t):
        return np.c_[4 * np.cos(t) - np.cos(4 * t), 4 * np.sin(t) - np.sin(4 * t)]

    X = epicycloid(np.random.default_rng(0).uniform(0, 2 * np.pi, 1000))
    X_te = epicycloid(np.linspace(0, 2 * np.pi, 1000))
    est = MoEAutoencoder(n_experts="auto", random_state=0).fit(X)
    fits = [(f["n_charts"], f["reason"]) for f in est.chart_choice_ if "tear" in f]
    assert fits[0][0] == 2 and fits[-1][1] is None  # the graph's count, then fits that stop
    assert all(reason in ("underfit", "tore") for _, reason in fits[:-1]) and len(fits) <= 2
    assert est.reconstruction_error(X_te, "hard") <= 1e-4


def test_an_atlas_that_still_underfits_says_so():
    """The turned picture (576-D closed curve) with decoders 32 wide underfits with 4 charts
    and, one chart more not halving its FVU, with 5 (session 13: training FVU 5.8e-4, 4.6e-4;
    100 wide it fits, 1.1e-5): the estimator warns as scikit-learn's do when they stop
    short. A curve that fits does not warn."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    X, _ = ds.make_turning_picture(1000, random_state=0)
    with pytest.warns(ConvergenceWarning, match=r"^5 charts still underfit \(training hard FVU "
                      r"[0-9.]+e-04 > 1e-04.*after 2 fits: more epochs or a larger width"):
        est = MoEAutoencoder(n_experts="auto", width=32, random_state=0).fit(X)
    assert [f["reason"] for f in est.chart_choice_ if "tear" in f] == ["underfit", "underfit"]
    X, _ = ds.make_figure8(1000, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        MoEAutoencoder(n_experts="auto", random_state=0).fit(X)


def test_untuned_s_curve_refits_the_chart_that_tears():
    """The neighbour graph gives the S-curve one chart (fold 3.6, flat 1.2); trained alone it
    tears at the S's middle (session 7: hard FVU 1.1e-3 to 2.8e-3), so the fit is repeated
    with two (moeae.tears)."""
    from sklearn.datasets import make_s_curve

    X, _ = make_s_curve(2000, random_state=0)
    X_te, _ = make_s_curve(2000, random_state=100)
    est = MoEAutoencoder(n_experts="auto", latent_dim=2, random_state=0).fit(X)
    fits = [f for f in est.chart_choice_ if "tear" in f]
    assert [f["n_charts"] for f in fits] == [1, 2] and fits[0]["tear"] > 4 > fits[1]["tear"]
    assert est.reconstruction_error(X_te, "hard") <= 1e-3


def test_curve_in_10d_with_noise_recovers_the_clean_curve():
    X, _ = ds.make_circle(1000, random_state=0)
    X_te, _ = ds.make_circle(1000, grid=True)
    noise = 0.01 * np.random.default_rng(0).standard_normal((1000, 10))
    Y = ds.embed(X, 10, random_state=0) + noise
    Y_te = ds.embed(X_te, 10, random_state=0)
    est = MoEAutoencoder(n_experts=4, random_state=0).fit(Y)
    assert est.reconstruction_error(Y_te, "hard") <= 5e-4


@pytest.mark.parametrize("make, experts, limit", [(ds.make_sphere, 4, 1e-4),
                                                  (ds.make_torus, 8, 5e-4)])
def test_surfaces_hard_fvu(make, experts, limit):
    X, _ = make(2000, random_state=0)
    X_te, _ = make(2000, random_state=100)
    est = MoEAutoencoder(n_experts=experts, latent_dim=2, random_state=0).fit(X)
    assert est.reconstruction_error(X_te, "hard") <= limit


def _pca_fvu(X_tr, X_te, k):
    pca = PCA(k).fit(X_tr)
    X_pca = pca.inverse_transform(pca.transform(X_te))
    return ((X_te - X_pca) ** 2).sum(1).mean() / ((X_te - X_te.mean(0)) ** 2).sum(1).mean()


def test_digits_beat_pca():
    X, _ = ds.load_digits()
    X_tr, X_te = X[:1400], X[1400:]
    est = MoEAutoencoder(n_experts=8, latent_dim=2, random_state=0).fit(X_tr)
    assert est.reconstruction_error(X_te, "hard") < _pca_fvu(X_tr, X_te, 4)
    # regularised against overfitting (training FVU ~0.2 vs ~0.4 held out) and trained as
    # long as the recipe did before session 13 (4000 steps; its 2000 now give 0.345 against
    # PCA's 0.342; no chart takes a solved output layer on digits), it beats PCA 8 (0.333)
    reg = MoEAutoencoder(n_experts=8, latent_dim=2, input_noise=0.1, weight_decay=1e-3,
                         epochs=180, random_state=0).fit(X_tr)
    assert reg.reconstruction_error(X_te, "hard") < _pca_fvu(X_tr, X_te, 8)


@pytest.mark.parametrize("make, experts", [(ds.make_circle, 2), (ds.make_figure8, 2),
                                           (ds.make_spiral, 4)])
def test_one_start_succeeds_on_19_of_20_seeds(make, experts):
    """Success rates, not lucky seeds: each seed draws its own training sample."""
    X_te, _ = make(1000, grid=True)
    fvu = []
    for seed in range(20):
        X, _ = make(1000, random_state=seed)
        est = MoEAutoencoder(n_experts=experts, random_state=seed).fit(X)
        fvu.append(est.reconstruction_error(X_te, "hard"))
    assert sum(f <= 1e-4 for f in fvu) >= 19, fvu


def test_sphere_distances_within_atlasae_s():
    """atlasae (4 caps given by hand) reports a mean distance 0.0017 and a worst 0.009-0.012
    on the training points; ours learns its cover."""
    X, _ = ds.make_sphere(1000, random_state=0)
    X_new, _ = ds.make_sphere(1000, random_state=100)
    est = MoEAutoencoder(n_experts=4, latent_dim=2, random_state=0).fit(X)
    for Y, mean, worst in ((X, 0.0017, 0.009), (X_new, 0.002, 0.01)):
        d = np.linalg.norm(est.inverse_transform(est.transform(Y)) - Y, axis=1)
        assert d.mean() < mean and d.max() < worst


@pytest.mark.parametrize("make, kw, k, charts, limit", [
    (ds.make_helix, dict(turns=3, pitch=0.3), 1, 4, 1e-4),  # turns 0.3 apart
    (ds.make_moebius, dict(half_twists=1), 2, 3, 1e-3),
    (ds.make_helicoid, dict(turns=2, pitch=0.5), 2, 3, 1e-3),
    # the graph gives 2 charts; solved (moeae.readout) they fit within the goal (session 13:
    # training 5.6e-4, new points 5.9e-4) but above the 4e-4 that moeae.tears parts underfits
    # by, and their residuals as trained agree (0.73): the atlas trains 3
    (ds.make_moebius, dict(half_twists=3), 2, 3, 1e-3),
])
def test_harder_manifolds_with_their_own_chart_count(make, kw, k, charts, limit):
    n = 1000 if k == 1 else 2000
    X, _ = make(n, random_state=0, **kw)
    X_te, _ = make(n, grid=True, **kw) if k == 1 else make(n, random_state=100, **kw)
    est = MoEAutoencoder(n_experts="auto", latent_dim=k, random_state=0).fit(X)
    assert est.chart_choice_[-1]["n_charts"] == charts  # what the atlas chose
    # in use after training: the Moebius band can end with 2 of its 3 (session 6: hard FVU
    # 1.5e-5 with 2; two overlapping strips cover it)
    assert 2 <= est.n_charts_ <= charts
    assert est.reconstruction_error(X_te, "hard") <= limit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_command_line_figure8(tmp_path, seed):
    import json

    from moeae.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", "figure8", "--experts", "2", "--seed", str(seed),
                 "--out", str(out)]) == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert rows[-1]["fvu_hard"] <= 1e-4
