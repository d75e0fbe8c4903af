"""Arc-length charts for curves (moeae.arclength): tables, projection, codes that keep lengths,
and that they survive saving, loading and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moeae import MoEAutoencoder
from moeae import datasets as ds
from moeae.arclength import (
    EXTEND,
    KNOTS,
    SMOOTH,
    TIE,
    extended,
    interp,
    network_codes,
    reach,
    smooth,
)
from moeae.geometry import speed_cv
from moeae.model import MoEAE

SHORT = dict(n_experts=2, latent_dim=1, epochs=60, n_init=1, device="cpu")


@pytest.fixture(scope="module")
def arc_fit():
    X, _ = ds.make_circle(300, random_state=0)
    return MoEAutoencoder(random_state=0, isometric=True, **SHORT).fit(X)


def test_interp_matches_numpy_inside_and_extends_the_end_segments():
    xk = torch.tensor([[0.0, 1.0, 3.0], [-1.0, 0.0, 2.0]], dtype=torch.float64)
    yk = torch.tensor([[0.0, 2.0, 3.0], [5.0, 4.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.5, 2.0, 4.0, -1.0], [-0.5, 1.0, 3.0, -2.0]], dtype=torch.float64)
    got = interp(q, xk, yk).numpy()
    for g in range(2):
        inside = (q[g] >= xk[g, 0]) & (q[g] <= xk[g, -1])
        assert np.allclose(got[g][inside.numpy()], np.interp(q[g][inside], xk[g], yk[g]))
    assert got[0, 2] == pytest.approx(3.5)  # slope 1/2 beyond 3
    assert got[0, 3] == pytest.approx(-2.0)  # slope 2 before 0
    assert got[1, 2] == pytest.approx(-2.0)
    assert got[1, 3] == pytest.approx(6.0)
    # points (a polyline): each coordinate as its own row of values
    pts = torch.stack([yk, 2 * yk + 1], -1)  # (G, T, 2)
    both = interp(q, xk, pts).numpy()
    assert np.allclose(both[..., 0], got) and np.allclose(both[..., 1], 2 * got + 1)


def test_isometric_curves_get_arc_length_charts_not_training_terms(arc_fit):
    tc, m = arc_fit.train_config_, arc_fit.model_
    assert tc.arc_length and tc.isometry == 0 and tc.fold_guard == 0
    assert m.arc and m.arc_code.shape == m.arc_length.shape == (1, 2, 1025)
    assert bool((m.arc_length.diff(dim=-1) > 0).all())  # every table inverts
    # the two charts' lengths add up to the circle's, less the gaps between one chart's last
    # point and the other's first (300 points, 0.021 apart), which their straight ends cover
    total = float(m.arc_length[0, :, -1].sum())
    assert 0.97 * 2 * np.pi < total < 1.5 * 2 * np.pi


def test_codes_move_at_unit_speed_along_the_curve(arc_fit):
    Xt, tt = ds.make_circle(1000, grid=True)
    codes = arc_fit.transform(Xt)
    cv = speed_cv(codes[:, 0].astype(int), codes[:, 1:], Xt, tt, closed=True)
    assert max(cv.values()) <= 0.05, cv
    # decoding moves at unit speed in data units: the code is arc length itself
    h = 1e-4
    up, down = codes.copy(), codes.copy()
    up[:, 1] += h
    down[:, 1] -= h
    speed = np.linalg.norm(arc_fit.inverse_transform(up) - arc_fit.inverse_transform(down),
                           axis=1) / (2 * h)
    assert np.median(np.abs(speed - 1)) < 0.01, np.percentile(speed, [5, 50, 95])
    assert arc_fit.reconstruction_error(Xt) < 1e-3


def test_projection_takes_the_nearest_chart_and_reconstructs_near_the_nearest_point(arc_fit):
    """Each point's chart is the one whose decoder, traced densely over its table's range
    and straight ends (brute force), passes nearest, or one passing within TIE knots of that
    (the router's, in an overlap); its reconstruction (the decoding of its smoothed code) lies
    within 2% of the smoothing kernel's least width of that chart's nearest point."""
    m = arc_fit.model_
    Xt, _ = ds.make_circle(200, grid=True)
    codes = arc_fit.transform(Xt)
    X_hat = arc_fit.inverse_transform(codes)
    near, step, gap = [], 0.0, 0.0
    first, last = (r[:, 0].numpy() for r in reach(m))
    for e in range(2):
        s = np.linspace(first[e], last[e], 20_001)
        step = max(step, s[1] - s[0])
        curve = arc_fit.inverse_transform(np.c_[np.full(len(s), e), s])
        gap = max(gap, float(np.linalg.norm(np.diff(curve, axis=0), axis=1).max()))
        near.append(np.linalg.norm(Xt[:, None] - curve[None], axis=-1).min(1))
    near = np.array(near)  # (2, n)
    best = near.min(0)
    chart = codes[:, 0].astype(int)
    knot = m.arc_length[0, :, -1].numpy() / (KNOTS - 1)  # (2,)
    tie = (TIE * knot.max()) ** 2
    clear = np.abs(near[0] ** 2 - near[1] ** 2) > tie + 1e-6  # not a tie between the charts
    assert clear.sum() > 150
    assert np.array_equal(chart[clear], near.argmin(0)[clear])
    own = near[chart, np.arange(len(chart))]
    assert np.all(own**2 <= best**2 + (TIE * knot[chart]) ** 2 + 1e-6)
    got = np.linalg.norm(Xt - X_hat, axis=1)
    width = SMOOTH * float(m.arc_length[0, :, -1].max()) / (KNOTS - 1)  # the kernel's least
    assert np.all(got <= own + 0.02 * width), ((got - own).max(), width)
    # the trace's points lie at most gap apart (about step: arc length is exact at the
    # table's knots, between them up to a third off), so the nearest of them is at most
    # gap / 2 further
    assert gap < 2 * step, (gap, step)
    assert np.all(got**2 >= best**2 - (gap / 2) ** 2 - 1e-12)


def _corner(T=1025):
    """A stand-in for a fitted model of one chart whose traced curve has a right-angled
    corner: the decoder maps u in [-1, 1] to (u, |u|); arc length sqrt(2) (u + 1)."""
    from types import SimpleNamespace

    u = torch.linspace(-1, 1, T, dtype=torch.float64)
    return SimpleNamespace(
        expert_model=torch.tensor([0]), expert_slot=torch.tensor([0]),
        scale=torch.ones(1, 1, 1, dtype=torch.float64),
        shift=torch.zeros(1, 1, 2, dtype=torch.float64),
        arc_code=u[None, None], arc_length=(np.sqrt(2) * (u + 1))[None, None],
        decoder=lambda z: torch.cat([z, z.abs()], -1))


def _nearest_on_corner(x):
    """Brute force: arc length and squared distance of the nearest point of (u, |u|)."""
    u = np.linspace(-1, 1, 200_001)
    curve = np.c_[u, np.abs(u)]
    d2 = ((x[:, None] - curve[None]) ** 2).sum(-1)
    i = d2.argmin(1)
    return np.sqrt(2) * (u[i] + 1), d2[np.arange(len(x)), i]


def test_smoothing_keeps_codes_on_the_curve_and_spreads_the_jump_beside_a_corner():
    m = _corner()
    # on an arm, away from the corner and the ends: the code is the point's own arc length
    u = np.linspace(-0.9, -0.2, 50)
    on = np.c_[u, np.abs(u)]
    s, d2 = _nearest_on_corner(on)
    got = smooth(m, torch.as_tensor(on)[None], torch.as_tensor(s)[None], torch.as_tensor(d2)[None])
    assert np.allclose(got[0].numpy(), np.sqrt(2) * (u + 1), atol=1e-5)
    # inside the corner the nearest point jumps from one arm to the other; smoothed, it moves
    a = np.linspace(-0.05, 0.05, 101)
    inside = np.c_[a, np.full_like(a, 0.1)]
    s, d2 = _nearest_on_corner(inside)
    assert np.abs(np.diff(s)).max() > 0.1  # the jump: 0.1 of u, 0.14 of arc length
    got = smooth(m, torch.as_tensor(inside)[None], torch.as_tensor(s)[None],
                 torch.as_tensor(d2)[None])[0].numpy()
    assert np.all(np.diff(got) > 0)  # still in order along the curve
    assert np.abs(np.diff(got)).max() < 0.01, np.abs(np.diff(got)).max()
    assert got[50] == pytest.approx(np.sqrt(2), abs=0.01)  # the middle: about the corner's code


def test_decoded_codes_encode_to_themselves(arc_fit):
    m = arc_fit.model_
    e = 0
    L = float(m.arc_length[0, e, -1])
    codes = np.c_[np.zeros(50), np.linspace(0.2 * L, 0.8 * L, 50)]  # inside chart 0
    back = arc_fit.transform(arc_fit.inverse_transform(codes))
    assert np.array_equal(back[:, 0], codes[:, 0])
    # within 2% of the smoothing kernel's least width: the codes are smoothed along the traced
    # polyline, which cuts the network's curve between knots
    width = SMOOTH * L / (KNOTS - 1)
    assert np.abs(back[:, 1] - codes[:, 1]).max() <= 0.02 * width
    # the network's own codes decode to the same points
    raw = network_codes(m, codes)
    with torch.no_grad():
        y = m.decoder(torch.as_tensor(raw[:, 1:])[None].expand(2, -1, -1))[e]
    y = y.numpy() * m.scale[0, 0, 0].item() + m.shift[0, 0].numpy()
    assert np.allclose(y, arc_fit.inverse_transform(codes), atol=1e-9)


def test_tables_survive_save_and_load_and_older_files_load_without(arc_fit, tmp_path):
    Xt, _ = ds.make_circle(100, grid=True)
    arc_fit.save(tmp_path / "m.safetensors")
    back = MoEAutoencoder.load(tmp_path / "m.safetensors")
    assert back.model_.arc
    assert np.array_equal(back.transform(Xt), arc_fit.transform(Xt))
    # a state saved before the tables existed: plain charts
    state = {k: v for k, v in arc_fit.model_.state_dict().items() if not k.startswith("arc_")}
    plain = MoEAE(arc_fit.model_config_)
    plain.load_state_dict(state)
    assert not plain.arc and not any(k.startswith("arc_") for k in plain.state_dict())
    # and loading a plain state into a model with tables drops them
    with_tables = MoEAutoencoder.load(tmp_path / "m.safetensors").model_
    with_tables.load_state_dict(state)
    assert not with_tables.arc


def test_arc_length_needs_a_curve():
    X, _ = ds.make_sphere(200, random_state=0)
    est = MoEAutoencoder(n_experts=2, latent_dim=2, epochs=2, n_init=1, isometric=True,
                         random_state=0).fit(X)
    assert not est.model_.arc and not est.train_config_.arc_length
    assert est.train_config_.isometry > 0


def test_train_isometric_curve_keeps_its_tables_through_the_command_line(tmp_path):
    from moeae.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", "circle", "--experts", "2", "--epochs", "20",
                 "--n-samples", "200", "--isometric", "--out", str(out), "--threads",
                 "1"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["arc_length"] is True and cfg["train"]["isometry"] == 0.0
    Xt, _ = ds.make_circle(300, grid=True)
    np.save(tmp_path / "x.npy", Xt)
    assert main(["encode", str(out), str(tmp_path / "x.npy"), str(tmp_path / "c.npy"),
                 "--threads", "1"]) == 0
    codes = np.load(tmp_path / "c.npy")
    # codes are arc length: the two charts' codes span about the circle's length between them
    span = sum(np.ptp(codes[codes[:, 0] == e, 1]) for e in (0, 1))
    assert 0.9 * 2 * np.pi < span < 1.1 * 2 * np.pi
    assert main(["decode", str(out), str(tmp_path / "c.npy"), str(tmp_path / "y.npy"),
                 "--threads", "1"]) == 0
    from moeae.run import decode, encode, load_model

    model, _ = load_model(out)
    assert model.arc
    assert np.array_equal(codes, encode(model, Xt))
    assert np.array_equal(np.load(tmp_path / "y.npy"), decode(model, codes))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_arc_length_charts_on_cuda_equal_the_cpu_codes(arc_fit):
    """The same fitted model (float64) on the GPU: tables, projection and decoding give the
    CPU's codes and points."""
    import copy

    Xt, _ = ds.make_circle(500, grid=True)
    gpu = copy.deepcopy(arc_fit)
    gpu.model_ = gpu.model_.to("cuda")
    assert gpu.model_.arc_code.device.type == "cuda"
    codes = gpu.transform(Xt)
    ref = arc_fit.transform(Xt)
    assert np.array_equal(codes[:, 0], ref[:, 0])
    assert np.allclose(codes[:, 1], ref[:, 1], atol=1e-9)
    assert np.allclose(gpu.inverse_transform(codes), arc_fit.inverse_transform(ref), atol=1e-9)
    # tables built on the GPU, as a GPU fit builds them
    X, _ = ds.make_circle(300, random_state=0)
    fit = MoEAutoencoder(random_state=0, isometric=True, **{**SHORT, "device": "cuda"}).fit(X)
    assert fit.model_.arc and fit.reconstruction_error(Xt) < 1e-2


def _astroid(n, grid=False, seed=0):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) if grid else \
        np.random.default_rng(seed).uniform(0, 2 * np.pi, n)
    return np.c_[np.cos(t) ** 3, np.sin(t) ** 3]  # 4 cusps


def test_projection_reconstructs_closer_than_the_encoders_and_not_across_a_cusp(monkeypatch):
    """The same trained model coded by its encoders and then by projection (its tables set
    after training): the nearest point of the learned curve is the closer reconstruction. At
    a cusp the smoothing kernel reaches both sides of the tip and its mean decodes away from
    the point; a smoothed code is kept only where it decodes near the point (KEEP, SLACK)."""
    import moeae.arclength as al

    X, Xt = _astroid(600), _astroid(1000, grid=True)
    est = MoEAutoencoder(random_state=0, isometric=False, **{**SHORT, "epochs": 40}).fit(X)
    encoders = est.reconstruction_error(Xt)
    est.model_.set_arc_length(torch.as_tensor(X)[None])
    assert est.model_.arc
    projected = est.reconstruction_error(Xt)
    monkeypatch.setattr(al, "KEEP", float("inf"))  # every smoothed code kept
    across = est.reconstruction_error(Xt)
    # measured: 4.3e-5 by the encoders, 1.7e-5 projected, 4.5e-5 with every smoothed code kept
    assert projected < 0.6 * encoders, (projected, encoders)
    assert projected < 0.6 * across, (projected, across)


def test_charts_go_on_straight_beyond_their_ends():
    """Inside its table a chart is its decoder; beyond, the line along its end segment: the
    corner (u, |u|) leaves u = 1 along (1, 1) and u = -1 along (-1, 1)."""
    m = _corner()
    z = torch.tensor([[-1.3, -1.0, -0.4, 0.0, 0.7, 1.0, 1.2]], dtype=torch.float64)[..., None]
    got = extended(m, z)[0].numpy()
    u = z[0, :, 0].numpy()
    inside = np.abs(u) <= 1
    assert np.allclose(got[inside], np.c_[u, np.abs(u)][inside])
    assert np.allclose(got[-1], [1.2, 1.2]) and np.allclose(got[0], [-1.3, 1.3])
    # the reach: EXTEND of the code range (2) beyond each end, in arc length
    first, last = reach(m)
    assert float(first) == pytest.approx(-np.sqrt(2) * 2 * EXTEND)
    assert float(last) == pytest.approx(np.sqrt(2) * (2 + 2 * EXTEND))
    # a point on the straight end keeps its own arc length when smoothed
    a = np.array([0.02, 0.05])
    on = np.c_[1 + a, 1 + a]
    s = np.sqrt(2) * (2 + a)
    got = smooth(m, torch.as_tensor(on)[None], torch.as_tensor(s)[None],
                 torch.zeros(1, 2, dtype=torch.float64))[0].numpy()
    assert np.allclose(got, s, atol=1e-6)


def test_a_point_past_an_open_curves_end_is_coded_on_its_straight_end():
    """An open arc of a parabola, one chart: a point a little past the learned end, along the
    end's direction, is coded beyond the chart's length and reconstructed where it is; a point
    far past it stops at the straight end's reach; codes past the end decode on a line."""
    t = np.random.default_rng(0).uniform(-1, 1, 300)
    est = MoEAutoencoder(random_state=0, **{**SHORT, "n_experts": 1}).fit(np.c_[t, t**2])
    m = est.model_
    L = float(m.arc_length[0, 0, -1])
    last = float(reach(m)[1][0, 0])
    assert L == pytest.approx(np.sqrt(5) + np.arcsinh(2) / 2, rel=0.02)  # the arc's length
    end, before = est.inverse_transform(np.array([[0, L], [0, L - 1e-3]]))
    direction = (end - before) / np.linalg.norm(end - before)
    step = 0.5 * (last - L)
    codes = est.transform(np.array([end + step * direction, end + 10 * step * direction]))
    assert codes[0, 1] == pytest.approx(L + step, abs=1e-6)
    assert np.linalg.norm(est.inverse_transform(codes[:1]) - (end + step * direction)) < 1e-6
    assert codes[1, 1] == pytest.approx(last, abs=1e-6)
    line = est.inverse_transform(np.c_[np.zeros(3), L + np.array([0.1, 0.2, 0.3]) * step])
    assert np.allclose(line[2] - line[1], line[1] - line[0], atol=1e-9)
