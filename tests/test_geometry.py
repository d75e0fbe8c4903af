"""Constrained charts: Jacobian-vector products, the isometry and folding terms, distortion
measures, transition maps and orientability, sampling, and the new data sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moeae import datasets as ds
from moeae.config import ModelConfig, TrainConfig, isometric_overrides, recipe
from moeae.geometry import (
    distance_ratio_spread,
    isometry_terms,
    speed_cv,
    stacked_jvp,
    swiss_roll_arclength,
)
from moeae.layers import StackedMLP
from moeae.model import MoEAE
from moeae.objectives import Objective
from moeae.transitions import Transition, is_orientable, orientation


def _mlp(act, G=3, k=2, d=3, seed=0, out="linear"):
    mlp = StackedMLP(G, k, 16, 3, d, out, hidden_activation=act).double()
    gen = torch.Generator().manual_seed(seed)
    for g in range(G):
        mlp.reset_group_(g, gen)
    return mlp


@pytest.mark.parametrize("act,out", [("relu", "linear"), ("silu", "linear"),
                                     ("tanh", "tanh"), ("softplus", "linear")])
def test_stacked_jvp_matches_finite_differences(act, out):
    mlp = _mlp(act, out=out)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20, 2, generator=gen, dtype=torch.float64)
    v = torch.randn(3, 20, 2, generator=gen, dtype=torch.float64)
    y, jv = stacked_jvp(mlp, x, v)
    h = 1e-6
    fd = (mlp(x + h * v) - mlp(x - h * v)) / (2 * h)
    assert torch.equal(y, mlp(x))  # the same products as the forward pass
    assert torch.allclose(jv, fd, atol=1e-6), (jv - fd).abs().max()


def test_isometry_terms_equal_an_independent_computation():
    """The terms from stretches of a decoder equal a numpy computation from its Jacobian by
    finite differences: weighted mean of (r / s^2 - 1)^2 and of the band excess."""
    dec = _mlp("relu", G=2, k=2, d=3, seed=3)
    gen = torch.Generator().manual_seed(2)
    z = torch.rand(2, 30, 2, generator=gen, dtype=torch.float64) - 0.5
    v = torch.nn.functional.normalize(torch.randn(2, 30, 2, generator=gen,
                                                  dtype=torch.float64), dim=-1)
    w = torch.rand(2, 30, generator=gen, dtype=torch.float64)
    _, jv = stacked_jvp(dec, z, v)
    iso, guard, mass, s2 = isometry_terms((jv**2).sum(-1), w, band=1.2)
    h = 1e-6
    for g in range(2):
        cols = [((dec(z + h * e) - dec(z - h * e)) / (2 * h))[g].detach().numpy()
                for e in torch.eye(2, dtype=torch.float64)]
        J = np.stack(cols, -1)  # (30, 3, 2)
        r = np.einsum("bdk,bk->bd", J, v[g].numpy())
        r = (r**2).sum(-1)
        ww = w[g].numpy()
        s = (ww * r).sum() / ww.sum()
        expect_iso = (ww * (r / s - 1) ** 2).sum() / ww.sum()
        excess = np.maximum(np.abs(np.log(r / s)) - 2 * np.log(1.2), 0)
        expect_guard = (ww * excess**2).sum() / ww.sum()
        assert s2[g].item() == pytest.approx(s, rel=1e-6)
        assert iso[g].item() == pytest.approx(expect_iso, rel=1e-5)
        assert guard[g].item() == pytest.approx(expect_guard, rel=1e-5, abs=1e-12)
        assert mass[g].item() == pytest.approx(ww.sum())


def test_isometry_term_is_zero_for_a_scaled_isometry_and_scale_free():
    r = torch.full((1, 10), 7.0)  # the same stretch everywhere: isometric up to scale
    iso, guard, _, s2 = isometry_terms(r, torch.ones(1, 10), band=2.0)
    assert iso.item() == pytest.approx(0.0) and guard.item() == 0.0 and s2.item() == 7.0
    r2 = torch.tensor([[1.0, 4.0, 1.0, 4.0]])
    a = isometry_terms(r2, torch.ones(1, 4), 2.0)[0]
    b = isometry_terms(100 * r2, torch.ones(1, 4), 2.0)[0]
    assert a.item() == pytest.approx(b.item()) and a.item() > 0.3


def test_chart_terms_weighted_by_membership_and_finite_without_points():
    mc, tc = recipe("best", n_features=2, n_experts=3, latent_dim=1, isometry=1.0,
                    fold_guard=1.0)
    m = MoEAE(mc, [3, 2]).double()
    m.reset_parameters([0, 1])
    x = torch.randn(2, 40, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = m(x)
    weight = torch.zeros(2, 40, 3, dtype=torch.float64)
    weight[:, :, 0] = 1.0  # every point in chart 0: charts 1, 2 have no points
    iso, guard, _ = Objective(tc).chart_terms(m, out, weight)
    assert iso.shape == (2,) and torch.isfinite(iso).all() and torch.isfinite(guard).all()
    iso.sum().backward()
    assert m.decoder.layers[0].weight.grad[1:3].abs().sum() == 0  # no points, no gradient
    assert m.decoder.layers[0].weight.grad[0].abs().sum() > 0


def test_speed_cv_zero_for_arc_length_and_known_for_a_quadratic():
    t = np.linspace(0, 2 * np.pi, 2001)
    X = np.c_[np.cos(t), np.sin(t)]
    chart = (t >= np.pi).astype(int)
    z = np.where(chart == 0, t / 4, -(t - np.pi) / 4)[:, None]  # speed 1/4 everywhere
    cv = speed_cv(chart, z, X, t, closed=True)
    assert max(cv.values()) < 1e-3
    z2 = (t**2)[:, None]  # speed 2t: CV of t over [0, 2 pi) is 1/sqrt(3)
    cv2 = speed_cv(np.zeros_like(chart), z2, X, t, closed=False)
    assert cv2[0] == pytest.approx(1 / math.sqrt(3), rel=0.01)


def test_speed_cv_skips_the_pair_of_a_point_given_twice():
    """A closed curve's grid that holds t = 0 and t = 2 pi has one point twice (1e-16 apart);
    codes that differ there by rounding must not count as a speed."""
    t = np.linspace(0, 2 * np.pi, 1000)  # both ends: the last point is the first again
    X = np.c_[np.cos(t), np.sin(t)]
    assert 0 < np.linalg.norm(X[-1] - X[0]) < 1e-12
    chart = ((t < 1.0) | (t > 5.0)).astype(int)  # the wrap pair (2 pi, 0) lies in chart 1
    z = ((t + 2 * np.pi * (t < 1.0)) / 4)[:, None]  # speed 1/4 everywhere
    z[0] = z[-1] + 1e-13  # the same point, coded 1e-13 apart
    cv = speed_cv(chart, z, X, t, closed=True)
    assert max(cv.values()) < 1e-3, cv


def test_distance_ratio_spread_one_for_scaled_charts_and_large_for_a_stretch():
    rng = np.random.default_rng(0)
    U = rng.uniform(0, 1, (800, 2))
    chart = (U[:, 0] > 0.5).astype(int)
    z = np.where(chart[:, None] == 0, 3 * U, -0.5 * U)  # one scale per chart
    assert distance_ratio_spread(chart, z, U) == pytest.approx(1.0, abs=1e-9)
    z2 = np.c_[U[:, 0] ** 2, U[:, 1]]  # stretched along the first axis
    assert distance_ratio_spread(chart, z2, U) > 1.5


def test_swiss_roll_arclength_matches_numeric_integration():
    t = np.linspace(1.5 * np.pi, 4.5 * np.pi, 20001)
    X, _ = np.c_[t * np.cos(t), t * np.sin(t)], None
    numeric = np.r_[0, np.cumsum(np.linalg.norm(np.diff(X, axis=0), axis=1))]
    s = swiss_roll_arclength(t) - swiss_roll_arclength(t[0])
    assert np.abs(s - numeric).max() < 1e-3 * s[-1]


# -- orientability --------------------------------------------------------------------------

def _tr(a, b, sign, agreement=1.0):
    return Transition(a, b, 20, sign, agreement, 0.0, np.zeros(3))


def test_orientability_from_signs_of_synthetic_atlases():
    # four charts around a band: a cycle with one reversal is a Moebius band
    moebius = [_tr(0, 1, 1), _tr(1, 2, 1), _tr(2, 3, 1), _tr(0, 3, -1)]
    assert not is_orientable(moebius, 4)
    two_twists = [_tr(0, 1, -1), _tr(1, 2, 1), _tr(2, 3, 1), _tr(0, 3, -1)]
    assert is_orientable(two_twists, 4)
    o, bad = orientation(two_twists, 4)
    assert not bad and all(o[t.source] * o[t.target] == t.sign for t in two_twists)
    # two charts of a circle meet twice (two pieces of overlap): signs must agree
    assert is_orientable([_tr(0, 1, -1), _tr(0, 1, -1)], 2)
    assert not is_orientable([_tr(0, 1, -1), _tr(0, 1, 1)], 2)
    # an untrusted piece (signs disagree inside it) is left out
    assert is_orientable([_tr(0, 1, -1), _tr(0, 1, 1, agreement=0.6)], 2)
    assert is_orientable([], 3)  # no overlaps: nothing contradicts


# -- data sets --------------------------------------------------------------------------------

@pytest.mark.parametrize("h", [0, 1, 2, 3])
def test_moebius_points_follow_the_formula(h):
    X, t = ds.make_moebius(500, half_twists=h, radius=1.0, width=0.3, random_state=0)
    u, v = t.T
    a = 0.5 * h * u
    expect = np.c_[(1 + v * np.cos(a)) * np.cos(u), (1 + v * np.cos(a)) * np.sin(u),
                   v * np.sin(a)]
    assert np.allclose(X, expect)
    assert u.min() >= 0 and u.max() < 2 * np.pi and np.abs(v).max() <= 0.3
    # the centre line is the unit circle and the cross-section at u = 0 and 2 pi differ by
    # h half turns: the section's direction flips sign for odd h
    d0 = np.array([1.0, 0.0, 0.0])
    d2pi = np.array([np.cos(np.pi * h), 0.0, np.sin(np.pi * h)])
    assert np.allclose(d2pi, (-1) ** h * d0, atol=1e-12)


def test_cylinder_points_follow_the_formula():
    X, t = ds.make_cylinder(400, radius=2.0, height=3.0, random_state=1)
    assert np.allclose(np.hypot(X[:, 0], X[:, 1]), 2.0)
    assert np.allclose(X[:, 2], t[:, 1]) and t[:, 1].min() >= 0 and t[:, 1].max() <= 3.0
    assert np.allclose(np.arctan2(X[:, 1], X[:, 0]) % (2 * np.pi), t[:, 0])


def test_new_data_sets_validate_their_arguments():
    with pytest.raises(ValueError, match="half_twists"):
        ds.make_moebius(10, half_twists=-1)
    with pytest.raises(ValueError, match="width"):
        ds.make_moebius(10, width=2.0)
    with pytest.raises(ValueError, match="radius"):
        ds.make_cylinder(10, radius=0.0)
    assert ds.get_dataset("mobius") is ds.DATASETS["moebius"]
    assert ds.get_dataset("cylinder").manifold_dim == 2


# -- configuration -------------------------------------------------------------------------

def test_isometric_overrides():
    assert isometric_overrides(None, 2) == isometric_overrides(None, 1) == {}
    off = {"isometry": 0.0, "fold_guard": 0.0, "arc_length": False}
    assert isometric_overrides(False, 2) == isometric_overrides(False, 1) == off
    assert isometric_overrides(True, 2)["isometry"] > 0
    assert isometric_overrides(0.5, 2) == {"isometry": 0.5, "fold_guard": 0.5,
                                           "arc_length": False}
    # curves: exact arc-length charts instead of the terms (the best recipe's own choice)
    assert isometric_overrides(0.5, 1) == {"isometry": 0.0, "fold_guard": 0.0,
                                           "arc_length": True}
    assert recipe("best")[1].arc_length
    for bad in (-1.0, float("nan"), "yes"):
        with pytest.raises(ValueError, match="isometric"):
            isometric_overrides(bad, 1)
    assert TrainConfig().isometry == 0.0 and ModelConfig().n_features == 2


def test_chart_activation_sets_the_experts_hidden_units_only():
    import torch.nn.functional as F

    mc, _ = recipe("best", chart_activation="silu")
    m = MoEAE(mc)
    assert m.encoder.hidden is F.silu and m.decoder.hidden is F.silu
    assert m.router.hidden is torch.relu
    assert MoEAE(recipe("best")[0]).encoder.hidden is torch.relu  # default: activation
