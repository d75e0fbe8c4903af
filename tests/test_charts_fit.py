"""Constrained charts on short fits: the isometry constraint, transition maps, sampling,
figures and the command line. Full-budget must-shows are marked slow."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import kstest

from moeae import MoEAutoencoder
from moeae import datasets as ds
from moeae.geometry import distance_ratio_spread, speed_cv, swiss_roll_arclength
from moeae.plot_geometry import plot_arclength, plot_chart_graph
from moeae.run import as_population
from moeae.sampling import volume_element
from moeae.training import evaluate

# 60 epochs: at 40 a 300-point circle can stop at hard FVU 3e-4, where its sample is not yet
# uniform (Kolmogorov-Smirnov D 0.063 on seed 0; 0.017-0.033 from 60 epochs on)
SHORT = dict(n_experts=2, latent_dim=1, epochs=60, n_init=1, device="cpu")


@pytest.fixture(scope="module")
def circle_fits():
    X, _ = ds.make_circle(300, random_state=0)
    plain = MoEAutoencoder(random_state=0, isometric=False, **SHORT).fit(X)
    iso = MoEAutoencoder(random_state=0, isometric=True, **SHORT).fit(X)
    return plain, iso


def _worst_cv(est, name="circle"):
    make, closed = {"circle": (ds.make_circle, True), "spiral": (ds.make_spiral, False),
                    "figure8": (ds.make_figure8, True)}[name]
    Xt, tt = make(1000, grid=True)
    codes = est.transform(Xt)
    cv = speed_cv(codes[:, 0].astype(int), codes[:, 1:], Xt, tt, closed)
    return max(cv.values()), est.reconstruction_error(Xt)


def _decoder_speed_cv(est):
    """Worst chart's CV of the decoder's speed |dx/dz| at the codes of a test grid."""
    Xt, _ = ds.make_circle(1000, grid=True)
    codes = est.transform(Xt)
    chart, z = codes[:, 0].astype(int), codes[:, 1:]
    _, vol = volume_element(est.model_, np.broadcast_to(z, (2,) + z.shape).copy())
    speed = vol[chart, np.arange(len(chart))]  # |J| for a curve
    return max(speed[chart == e].std() / speed[chart == e].mean() for e in np.unique(chart))


def test_isometric_curves_code_by_arc_length(circle_fits):
    """``isometric=True`` on a curve: arc-length charts (moeae.arclength), no training terms;
    the codes' speed along the curve varies far less than the encoder's."""
    plain, iso = circle_fits
    assert iso.train_config_.arc_length and iso.train_config_.isometry == 0
    assert not plain.train_config_.arc_length and not plain.model_.arc
    cv_plain, _ = _worst_cv(plain)
    cv_iso, fvu_iso = _worst_cv(iso)
    assert cv_iso < 0.5 * cv_plain, (cv_iso, cv_plain)
    assert fvu_iso < 1e-3, fvu_iso


def _trained_with_terms(X, weight):
    """A short fit with the isometry and folding terms at ``weight``, asked for directly (as
    a recipe override): the decoders' own speed is what the terms constrain."""
    import torch

    from moeae.config import recipe
    from moeae.model import MoEAE
    from moeae.training import Trainer

    # the output layers as trained: solved ones (moeae.readout) reconstruct closer but keep
    # the term's even speed less (decoder speed CV 0.071 against 0.028)
    mc, tc = recipe("best", n_features=2, n_experts=2, latent_dim=1, epochs=60, seed=0,
                    isometry=weight, fold_guard=weight, refit_outputs=False, device="cpu")
    tr = Trainer(MoEAE(mc), tc, [0], torch.device("cpu"))
    data = tr.data(X)
    tr.initialize(data)
    tr.fit(data, tc.epochs)
    est = MoEAutoencoder(**SHORT)  # to read it through the estimator's methods
    est.model_ = tr.model.select(0).double().eval()
    est.n_features_in_ = 2
    return est


def test_isometry_term_makes_the_decoders_speed_constant(circle_fits):
    X, _ = ds.make_circle(300, random_state=0)
    plain, termed = _trained_with_terms(X, 0.0), _trained_with_terms(X, 1.0)
    assert _decoder_speed_cv(termed) < 0.5 * _decoder_speed_cv(plain)
    assert termed.reconstruction_error(ds.make_circle(1000, grid=True)[0]) < 1e-3


def test_circle_transitions_agree_and_atlas_is_orientable(circle_fits):
    _, est = circle_fits
    tr = est.transitions()
    assert tr, "two charts of a circle must overlap"
    assert all({t.source, t.target} == {0, 1} for t in tr)
    assert all(t.agreement > 0.9 for t in tr)
    # a circle's two charts meet at both ends: one orientation for the whole atlas
    assert len({t.sign for t in tr}) == 1
    assert est.orientable() is True
    assert max(t.residual for t in tr) < 0.05


def test_sample_is_uniform_on_the_circle_and_on_the_manifold(circle_fits):
    _, est = circle_fits
    S = est.sample(4000, random_state=0)
    assert S.shape == (4000, 2)
    assert np.abs(np.linalg.norm(S, axis=1) - 1).max() < 0.05  # on the circle
    angle = np.arctan2(S[:, 1], S[:, 0]) % (2 * np.pi)
    assert kstest(angle / (2 * np.pi), "uniform").statistic <= 0.05
    assert np.array_equal(S, est.sample(4000, random_state=0))  # seeded
    with pytest.raises(ValueError, match="n must be"):
        est.sample(0)


def test_save_load_keeps_the_codes(circle_fits, tmp_path):
    _, est = circle_fits
    est.save(tmp_path / "m.safetensors")
    back = MoEAutoencoder.load(tmp_path / "m.safetensors")
    assert np.allclose(back.codes_, est.codes_, atol=1e-6)
    assert back.train_config_.isometry == est.train_config_.isometry
    assert back.orientable() == est.orientable()


def test_figures_of_the_atlas(circle_fits, tmp_path):
    _, est = circle_fits
    Xt, tt = ds.make_circle(400, grid=True)
    snap = {k: v[0] for k, v in evaluate(est.model_, as_population(Xt, est.model_.shift.dtype)
                                          ).items()}
    snap["t"] = tt
    p = plot_arclength({"circle": snap}, tmp_path / "arc.png")
    assert p.stat().st_size > 1000
    p = plot_chart_graph(est.transitions(), 2, tmp_path / "graph.png", title="circle")
    assert p.stat().st_size > 1000
    with pytest.raises(ValueError, match="'t'"):
        plot_arclength({"x": {k: v for k, v in snap.items() if k != "t"}}, tmp_path / "x.png")


def test_train_isometric_flag_reaches_the_config(tmp_path):
    from moeae.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", "circle", "--experts", "2", "--epochs", "1",
                 "--n-samples", "200", "--isometric", "--out", str(out), "--threads",
                 "1"]) == 0
    cfg = json.loads((out / "config.json").read_text())  # a curve: arc-length charts
    assert cfg["train"]["arc_length"] is True and cfg["train"]["isometry"] == 0.0
    assert main(["evaluate", str(out), "--json", "--threads", "1"]) == 0
    assert main(["train", "--data", "sphere", "--experts", "2", "--epochs", "1",
                 "--n-samples", "200", "--isometric", "0.5", "--out", str(tmp_path / "s"),
                 "--threads", "1"]) == 0
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())  # a surface: the terms
    assert cfg["train"]["isometry"] == 0.5 and cfg["train"]["fold_guard"] == 0.5
    assert cfg["train"]["arc_length"] is False


def test_isometric_must_be_a_weight():
    X, _ = ds.make_circle(50, random_state=0)
    with pytest.raises(ValueError, match="isometric"):
        MoEAutoencoder(isometric=-1.0, epochs=1).fit(X)


# -- full budget (the must-shows) ----------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name,E", [
    ("circle", 2),
    ("figure8", 2),  # seed 0: 0.006; seeds 0-19 meet it on 20 of 20 (docs/results.md)
    ("spiral", 4),  # seed 0: 0.007; seeds 0-19 on 19 of 20
])
def test_isometric_curves_keep_lengths(name, E):
    make = {"circle": ds.make_circle, "figure8": ds.make_figure8, "spiral": ds.make_spiral}
    X, _ = make[name](1000, random_state=0)
    est = MoEAutoencoder(n_experts=E, latent_dim=1, random_state=0, isometric=True).fit(X)
    cv, fvu = _worst_cv(est, name)
    assert cv <= 0.05 and fvu <= 1e-4, (cv, fvu)


@pytest.mark.slow
@pytest.mark.parametrize("name,E", [("figure8", 2), ("spiral", 4)])
def test_isometric_curves_keep_lengths_on_19_of_20_seeds(name, E):
    """A success rate, not one seed: each seed its own 1000-point sample (session 17, straight
    chart ends: figure-8 20 of 20 within 0.05, spiral 19 of 20; docs/results.md)."""
    make = {"figure8": ds.make_figure8, "spiral": ds.make_spiral}[name]
    ok = []
    for seed in range(20):
        X, _ = make(1000, random_state=seed)
        est = MoEAutoencoder(n_experts=E, latent_dim=1, random_state=seed, isometric=True).fit(X)
        cv, fvu = _worst_cv(est, name)
        ok.append(cv <= 0.05 and fvu <= 1e-4)
    assert sum(ok) >= 19, [s for s, good in enumerate(ok) if not good]


@pytest.mark.slow
def test_isometric_swiss_roll_keeps_neighbour_distances():
    X, _ = ds.make_swiss_roll(2000, random_state=0)
    Xt, tt = ds.make_swiss_roll(2000, random_state=10_000)
    est = MoEAutoencoder(n_experts=4, latent_dim=2, random_state=0, isometric=True).fit(X)
    codes = est.transform(Xt)
    U = np.c_[swiss_roll_arclength(tt[:, 0]), tt[:, 1]]
    assert distance_ratio_spread(codes[:, 0].astype(int), codes[:, 1:], U) <= 1.2


@pytest.mark.slow
@pytest.mark.parametrize("half_twists,expect", [(1, False), (2, True)])
def test_band_orientability(half_twists, expect):
    X, _ = ds.make_moebius(2000, half_twists=half_twists, random_state=0)
    est = MoEAutoencoder(n_experts=4, latent_dim=2, random_state=0).fit(X)
    assert est.orientable() is expect
