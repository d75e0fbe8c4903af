import numpy as np
import pytest

from moeae import datasets as ds


@pytest.mark.parametrize("make, formula, hi", [
    (ds.make_circle, lambda t: np.c_[np.cos(t), np.sin(t)], 2 * np.pi),
    (ds.make_spiral, lambda t: np.c_[t * np.cos(t), t * np.sin(t)], 6 * np.pi),
    (ds.make_figure8, lambda t: np.c_[np.sin(t), np.sin(t) * np.cos(t)], 2 * np.pi),
])
def test_curves_match_their_formula(make, formula, hi):
    X, t = make(500, random_state=3)
    assert X.shape == (500, 2) and t.shape == (500,)
    np.testing.assert_allclose(X, formula(t), atol=1e-12)
    assert 0 <= t.min() and t.max() <= hi
    # uniform on the range: the mean parameter is near the middle
    assert abs(t.mean() - hi / 2) < 0.1 * hi
    Xg, tg = make(1000, grid=True)
    np.testing.assert_allclose(tg, np.linspace(0, hi, 1000))
    np.testing.assert_allclose(Xg, formula(tg), atol=1e-12)


def test_figure8_crosses_itself_and_is_not_a_circle():
    X, t = ds.make_figure8(4, grid=True)
    np.testing.assert_allclose(X[0], [0, 0], atol=1e-12)  # t = 0
    Xc, _ = ds.make_circle(100, random_state=0)
    Xf, _ = ds.make_figure8(100, random_state=0)
    assert not np.allclose(np.linalg.norm(Xf, axis=1), 1.0)


def test_noise_and_seed():
    X0, t0 = ds.make_circle(200, random_state=1)
    X1, t1 = ds.make_circle(200, noise=0.1, random_state=1)
    np.testing.assert_array_equal(t0, t1)
    r = X1 - np.c_[np.cos(t1), np.sin(t1)]
    assert 0.08 < r.std() < 0.12
    X2, _ = ds.make_circle(200, random_state=1)
    np.testing.assert_array_equal(X0, X2)


def test_surfaces():
    X, t = ds.make_sphere(300, random_state=0)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0)
    np.testing.assert_allclose(X[:, 2], np.cos(t[:, 0]))
    X, t = ds.make_torus(300, random_state=0)
    ring = np.hypot(X[:, 0], X[:, 1])
    np.testing.assert_allclose((ring - 2.0) ** 2 + X[:, 2] ** 2, 1.0)
    X, t = ds.make_swiss_roll(300, random_state=0)
    np.testing.assert_allclose(X[:, 0], t[:, 0] * np.cos(t[:, 0]))
    X, t = ds.make_s_curve(300, random_state=0)
    np.testing.assert_allclose(X[:, 0], np.sin(t[:, 0]))


def test_trefoil_is_closed_3d():
    X, t = ds.make_trefoil(1001, grid=True)
    assert X.shape == (1001, 3)
    np.testing.assert_allclose(X[0], X[-1], atol=1e-12)


def test_embed_is_an_isometry():
    X, _ = ds.make_circle(100, random_state=0)
    Y = ds.embed(X, 10, random_state=0)
    assert Y.shape == (100, 10)
    d = lambda A: np.linalg.norm(A[:, None] - A[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(d(Y), d(X), atol=1e-10)
    Yn = ds.embed(X, 10, noise=0.01, random_state=0)
    assert 0.005 < (Yn - Y).std() < 0.015
    with pytest.raises(ValueError, match="cannot embed 2-D data"):
        ds.embed(X, 1)


def test_digits_shipped():
    X, y = ds.load_digits()
    assert X.shape == (1797, 64) and y.shape == (1797,)


@pytest.mark.parametrize("kw, msg", [
    ({"n_samples": 0}, "n_samples must be >= 1"),
    ({"n_samples": 10, "noise": -1.0}, "noise must be"),
    ({"n_samples": 10, "noise": float("nan")}, "noise must be"),
])
def test_bad_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ds.make_circle(**kw)


def test_get_dataset_lists_valid_names():
    assert ds.get_dataset("figure-8") is ds.DATASETS["figure8"]
    with pytest.raises(ValueError, match="valid names: circle, spiral, figure8"):
        ds.get_dataset("klein_bottle")  # (moebius is a data set now)
