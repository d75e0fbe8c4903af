"""Quality of the default recipe at its default budget (minutes: run with ``pytest -m slow``).

The thresholds are the ones the project promises in its README; each fit is seeded.
"""

import numpy as np
import pytest
from sklearn.decomposition import PCA

from moeae import MoEAutoencoder
from moeae import datasets as ds

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


def test_figure8_with_three_starts():
    # one start reaches 3e-5 to 1e-3 depending on its chart start; the best of three is reliable
    X, _ = ds.make_figure8(1000, random_state=0)
    X_te, _ = ds.make_figure8(1000, grid=True)
    est = MoEAutoencoder(n_experts=2, n_init=3, random_state=0).fit(X)
    assert est.reconstruction_error(X_te, "hard") <= 1e-4


@pytest.mark.xfail(reason="known gap (docs/recipes.md): the spiral with 4 charts reaches 1e-3 "
                          "to 6e-3, also with n_init=3; goal 1e-4", strict=False)
def test_spiral_hard_fvu():
    X, _ = ds.make_spiral(1000, random_state=0)
    X_te, _ = ds.make_spiral(1000, grid=True)
    est = MoEAutoencoder(n_experts=4, random_state=0).fit(X)
    assert est.reconstruction_error(X_te, "hard") <= 1e-4


def test_curve_in_10d_with_noise_recovers_the_clean_curve():
    X, _ = ds.make_circle(1000, random_state=0)
    X_te, _ = ds.make_circle(1000, grid=True)
    noise = 0.01 * np.random.default_rng(0).standard_normal((1000, 10))
    Y = ds.embed(X, 10, random_state=0) + noise
    Y_te = ds.embed(X_te, 10, random_state=0)
    est = MoEAutoencoder(n_experts=4, random_state=0).fit(Y)
    assert est.reconstruction_error(Y_te, "hard") <= 5e-4


@pytest.mark.parametrize("make, experts, limit", [(ds.make_sphere, 4, 1e-4),
                                                  (ds.make_torus, 8, 1e-3)])
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
    # regularised against overfitting (training FVU ~0.2 vs ~0.4 held out), it beats PCA 8
    reg = MoEAutoencoder(n_experts=8, latent_dim=2, input_noise=0.1, weight_decay=1e-3,
                         random_state=0).fit(X_tr)
    assert reg.reconstruction_error(X_te, "hard") < _pca_fvu(X_tr, X_te, 8)
