"""The scikit-learn estimator: API contract, quality on seeded data, persistence."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.utils.estimator_checks import check_estimator

import moeae
from moeae import MoEAutoencoder
from moeae.metrics import snapshot_metrics


@pytest.mark.parametrize("recipe", ["seed", "best"])
def test_check_estimator(recipe):
    est = MoEAutoencoder(n_experts=2, epochs=2, width=8, depth=1, recipe=recipe,
                         random_state=0)
    results = check_estimator(est, on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results
              if r["status"] == "failed"]
    assert not failed, failed
    assert len(results) > 40


def test_design_example_and_shapes():
    X, t = moeae.datasets.make_circle(n_samples=300, noise=0.0, random_state=0)
    est = MoEAutoencoder(n_experts=4, latent_dim=1, epochs=3, random_state=0)
    assert est.fit(X) is est
    Z = est.transform(X)
    assert Z.shape == (300, 2)
    assert set(np.unique(Z[:, 0])) <= {0.0, 1.0, 2.0, 3.0}
    # a curve's codes are arc length in data units, from 0 up to its chart's traced length,
    # and a little beyond both ends (the chart's straight ends, moeae.arclength.EXTEND)
    from moeae.arclength import reach

    first, last = (r[:, 0].numpy() for r in reach(est.model_))
    c = Z[:, 0].astype(int)
    assert np.all((Z[:, 1] >= first[c]) & (Z[:, 1] <= last[c]))
    assert np.all(first < 0) and np.all(last > est.model_.arc_length[0, :, -1].numpy())
    plain = MoEAutoencoder(n_experts=4, epochs=3, isometric=False, random_state=0).fit(X)
    assert not plain.model_.arc and np.all(np.abs(plain.transform(X)[:, 1]) <= 1.0)  # tanh
    assert est.inverse_transform(Z).shape == (300, 2)
    np.testing.assert_array_equal(est.predict(X), Z[:, 0].astype(int))
    X_hat = est.inverse_transform(Z)
    assert est.score(X) == pytest.approx(-((X - X_hat) ** 2).mean())
    assert len(est.history_) == 3


@pytest.mark.parametrize("isometric", [None, False])
def test_best_recipe_gives_clean_hard_charts_on_the_circle(isometric):
    """Each chart is one arc, with the encoders' codes (``isometric=False``) and with the
    default arc-length codes (projection onto the nearest chart's curve; in an overlap, where
    both curves pass within a knot of the point, the router's chart), which reconstruct closer
    still and keep lengths."""
    X, _ = moeae.datasets.make_circle(1000, random_state=0)
    X_te, t_te = moeae.datasets.make_circle(1000, grid=True)
    est = MoEAutoencoder(n_experts=2, epochs=40, random_state=0, isometric=isometric).fit(X)
    fvu_hard = est.reconstruction_error(X_te, "hard")
    from moeae.run import as_population
    from moeae.training import evaluate

    snap = {k: v[0] for k, v in evaluate(est.model_, as_population(X_te, est.model_.shift.dtype))
            .items()}
    m = snapshot_metrics(snap, t_te, closed=True, neighborhood=False)
    assert m["experts_used"] == 2
    if isometric is None:  # measured 1.8e-7 and 0.001
        assert est.model_.arc
        assert fvu_hard < 1e-6, f"hard FVU {fvu_hard:.2e} on the circle with 2 charts"
        assert m["speed_cv_max"] < 0.02
    else:
        assert fvu_hard < 1e-4, f"hard FVU {fvu_hard:.2e} on the circle with 2 charts"
    assert m["max_arcs_per_chart"] == 1
    assert m["max_z_jump"] < 0.25


def test_seed_recipe_vanilla_fails_as_the_seed_says():
    X, _ = moeae.datasets.make_circle(1000, random_state=0)
    X_te, _ = moeae.datasets.make_circle(1000, grid=True)
    est = MoEAutoencoder(n_experts=1, recipe="seed", random_state=0).fit(X)
    mse = -est.score(X_te)
    assert mse > 0.1, "one chart cannot encode a circle"


def test_same_seed_same_numbers():
    X, _ = moeae.datasets.make_figure8(200, random_state=1)
    a = MoEAutoencoder(n_experts=2, epochs=3, random_state=7).fit(X).transform(X)
    b = MoEAutoencoder(n_experts=2, epochs=3, random_state=7).fit(X).transform(X)
    c = MoEAutoencoder(n_experts=2, epochs=3, random_state=17).fit(X).transform(X)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_save_load_and_pickle_round_trip(tmp_path):
    X, _ = moeae.datasets.make_circle(200, random_state=0)
    est = MoEAutoencoder(n_experts=2, epochs=2, random_state=0).fit(X)
    Z = est.transform(X)
    path = tmp_path / "model.safetensors"
    est.save(path)
    est2 = MoEAutoencoder.load(path)
    np.testing.assert_allclose(est2.transform(X), Z, atol=1e-6)
    assert est2.get_params()["n_experts"] == 2
    est3 = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(est3.transform(X), Z)


def test_latent_dim_two_on_the_sphere():
    X, _ = moeae.datasets.make_sphere(400, random_state=0)
    est = MoEAutoencoder(n_experts=4, latent_dim=2, epochs=3, random_state=0).fit(X)
    Z = est.transform(X)
    assert Z.shape == (400, 3)
    np.testing.assert_allclose(est.inverse_transform(Z).shape, (400, 3))


def test_in_a_pipeline():
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, _ = moeae.datasets.make_circle(200, random_state=0)
    pipe = make_pipeline(StandardScaler(), MoEAutoencoder(n_experts=2, epochs=2,
                                                          random_state=0))
    assert pipe.fit_transform(X).shape == (200, 2)


def test_n_init_keeps_the_best_start():
    X, _ = moeae.datasets.make_figure8(300, random_state=0)
    kw = dict(n_experts=2, epochs=8, width=16, depth=2)
    best = MoEAutoencoder(n_init=3, random_state=5, **kw).fit(X)
    singles = [MoEAutoencoder(n_init=1, random_state=5 + i, **kw).fit(X) for i in range(3)]
    errors = [s.reconstruction_error(X, "hard") for s in singles]
    # the kept start is the one alone with the lowest training error, up to float rounding
    assert best.reconstruction_error(X, "hard") == pytest.approx(min(errors), rel=1e-3)
    assert best.train_config_.seed == 5 + int(np.argmin(errors))
    with pytest.raises(ValueError, match="n_init must be an int >= 1 or .auto., got 0"):
        MoEAutoencoder(n_init=0).fit(X)


def test_command_line_trains_what_the_estimator_trains(tmp_path):
    """`moeae train` and MoEAutoencoder() share one default (one start, the best recipe):
    the same data and seed give the same weights; --n-init 2 keeps what n_init=2 keeps."""
    from moeae.cli import main
    from moeae.run import load_model

    X, _ = moeae.datasets.make_figure8(300, random_state=3)
    np.save(tmp_path / "X.npy", X)
    for n_init in (None, 2):
        out = tmp_path / f"run{n_init}"
        extra = [] if n_init is None else ["--n-init", str(n_init)]
        assert main(["train", "--data", str(tmp_path / "X.npy"), "--experts", "2", "--seed",
                     "3", "--epochs", "3", "--out", str(out), *extra]) == 0
        run_model, _ = load_model(out)
        est = MoEAutoencoder(n_experts=2, epochs=3, random_state=3,
                             n_init="auto" if n_init is None else n_init).fit(X)
        ours = est.model_.state_dict()
        for name, w in run_model.state_dict().items():
            np.testing.assert_array_equal(w.numpy(), ours[name].float().double().numpy(),
                                          err_msg=name)
        assert est.train_config_.n_init == (n_init or 1)


def test_n_experts_auto_picks_and_reports_the_chart_count(tmp_path):
    X, _ = moeae.datasets.make_circle(400, random_state=0)
    # 20 epochs: a shorter fit barely moves from the mean, and its solved output layers
    # (moeae.readout) then reconstruct neighbours far apart, which reads as a tear
    est = MoEAutoencoder(n_experts="auto", epochs=20, width=16, depth=2, random_state=0).fit(X)
    assert est.model_config_.n_experts == 2  # one chart would close on itself
    assert est.chart_choice_[0]["flat"] > 10 and est.chart_choice_[1]["flat"] < 2.5
    assert est.n_charts_ == len(np.unique(est.predict(X)))  # the charts in use
    est.save(tmp_path / "m.safetensors")
    back = MoEAutoencoder.load(tmp_path / "m.safetensors")
    assert back.n_charts_ == est.n_charts_ and back.chart_choice_ == est.chart_choice_
    with pytest.raises(TypeError, match="n_experts must be an int or 'auto', got 'many'"):
        MoEAutoencoder(n_experts="many").fit(X)


def test_subnormals_are_flushed_only_while_training():
    from moeae.optim import flush_denormals

    tiny = torch.tensor([1e-39])  # subnormal in float32
    assert (tiny * 1.0).item() != 0.0
    with flush_denormals():
        assert (tiny * 1.0).item() == 0.0
    assert (tiny * 1.0).item() != 0.0  # the caller's setting is back
