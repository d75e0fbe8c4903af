import math

import numpy as np
import pytest
from sklearn.manifold import trustworthiness as sk_trustworthiness

from moeae.metrics import aggregate, atlas_embedding, chart_shape, snapshot_metrics, trustworthiness


def test_trustworthiness_equals_scikit_learn(rng):
    X = rng.random((300, 3))
    E = X[:, :1] + 0.05 * rng.random((300, 1))
    for k in (1, 5, 12):
        assert trustworthiness(X, E, k) == pytest.approx(sk_trustworthiness(X, E, n_neighbors=k),
                                                         abs=1e-12)
        assert trustworthiness(E, X, k) == pytest.approx(sk_trustworthiness(E, X, n_neighbors=k),
                                                         abs=1e-12)
    with pytest.raises(ValueError, match="n_neighbors"):
        trustworthiness(X[:4], E[:4], 3)


def test_chart_shape_counts_arcs_and_jumps():
    t = np.linspace(0, 1, 100)
    z = np.where(t < 0.5, t, t - 0.5)[:, None]
    chart = (t >= 0.5).astype(int)
    assert chart_shape(chart, z, t, closed=False) == {"max_arcs_per_chart": 1,
                                                       "max_z_jump": pytest.approx(1 / 49)}
    # a chart wrapping round the seam of a closed curve is one arc, not two
    wrap = ((t > 0.25) & (t < 0.75)).astype(int)
    zz = np.where(wrap == 1, t, (t + 0.5) % 1.0)[:, None]
    assert chart_shape(wrap, zz, t, closed=True)["max_arcs_per_chart"] == 1
    assert chart_shape(wrap, zz, t, closed=False)["max_arcs_per_chart"] == 2
    # z that goes back and forth is continuous (small jumps); a step is a jump of the range
    fold = chart_shape(np.zeros(100, int), np.abs(np.sin(2 * np.pi * t))[:, None], t, False)
    assert fold["max_z_jump"] < 0.1
    # two arcs of one chart (a V through a crossing) are judged each on its own
    v_chart = ((t > 0.25) & (t < 0.75)).astype(int)
    v = chart_shape(v_chart, np.where(v_chart == 0, np.abs(t - 0.5), t)[:, None], t, False)
    assert v["max_arcs_per_chart"] == 2 and v["max_z_jump"] < 0.05
    jumpy = chart_shape(np.zeros(100, int), (t > 0.5).astype(float)[:, None], t, False)
    assert jumpy["max_z_jump"] == 1.0


def _snap(x, x_soft, x_hard, chart, E=2):
    probs = np.eye(E)[chart] * 0.8 + 0.2 / E
    lat = np.zeros((E, len(x), 1))
    return {"inputs": x, "x_soft": x_soft, "x_hard": x_hard, "chart": chart, "probs": probs,
            "latents": lat}


def test_snapshot_metrics_values(rng):
    x = rng.normal(size=(200, 2))
    chart = (x[:, 0] > 0).astype(int)
    m = snapshot_metrics(_snap(x, x * 0.9, np.zeros_like(x), chart), neighborhood=False)
    assert m["mse_soft"] == pytest.approx(((x * 0.1) ** 2).mean())
    assert m["mse_hard"] == pytest.approx((x**2).mean())
    total = ((x - x.mean(0)) ** 2).sum(1).mean()
    assert m["fvu_hard"] == pytest.approx((x**2).sum(1).mean() / total)
    assert m["experts_used"] == 2
    assert m["top_prob"] == pytest.approx(0.9)
    assert math.isnan(m["trustworthiness"]) and math.isnan(m["max_arcs_per_chart"])


def test_atlas_embedding_separates_charts():
    emb = atlas_embedding(np.array([0, 1, 2]), np.array([[1.0], [-1.0], [0.0]]))
    np.testing.assert_allclose(emb[:, 0], [1.0, 9.0, 20.0])
    # arc-length codes run to their chart's length: the charts still do not overlap
    chart = np.repeat([0, 1], 50)
    z = np.r_[np.linspace(0, 40, 50), np.linspace(0, 25, 50)][:, None]
    emb = atlas_embedding(chart, z)
    assert emb[chart == 0, 0].max() < emb[chart == 1, 0].min()


def test_aggregate_mean_and_sd():
    rows = [{"dataset": "c", "n_experts": 2, "epoch": 1, "seed": s, "mse": v}
            for s, v in enumerate([1.0, 2.0, 3.0])]
    (row,) = aggregate(rows, ["dataset", "n_experts", "epoch"])
    assert row["mse"] == 2.0 and row["mse_sd"] == pytest.approx(1.0) and row["n_seeds"] == 3
