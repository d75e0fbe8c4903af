"""Tests for moeae.plot on small synthetic snapshots (no training)."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moeae import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_snapshot(n: int = 200, d: int = 2, n_experts: int = 2, with_t: bool = True, seed=0):
    """A circle of n points (embedded in d dimensions), x_soft shrunk, charts as equal arcs."""
    t = np.linspace(0.0, 2 * np.pi, n)
    x = np.column_stack([np.cos(t), np.sin(t)])
    if d == 3:
        x = np.column_stack([x, 0.3 * np.sin(3 * t)])
    elif d > 3:
        q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, 2)))  # (d, 2) orthonormal
        x = x @ q.T
    chart = np.minimum(np.arange(n) * n_experts // n, n_experts - 1)
    latents = np.zeros((n_experts, n, 1))
    latents[chart, np.arange(n), 0] = t - t[chart].mean()
    snap = {
        "inputs": x, "x_soft": 0.8 * x, "x_hard": 0.9 * x, "chart": chart,
        "probs": np.eye(n_experts)[chart],
        "expert_outputs": np.repeat(0.8 * x[None], n_experts, axis=0), "latents": latents,
    }
    if with_t:
        snap["t"] = t
    return snap


def check_png(path, width: int, height: int) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert mpimg.imread(path).shape[:2] == (height, width)


@pytest.fixture
def captured(monkeypatch):
    """Collect the figures instead of rendering them: checks structure without drawing."""
    figs = []
    monkeypatch.setattr(plot, "_save", lambda fig, path: figs.append(fig) or path)
    return figs


def test_plot_vanilla_writes_png(tmp_path):
    snaps = {name: make_snapshot(n_experts=1) for name in ("circle", "figure8", "spiral")}
    path = tmp_path / "vanilla.png"
    assert plot.plot_vanilla(snaps, path, epoch=5) == path
    check_png(path, 1500, 500)


def test_plot_vanilla_titles_and_labels(captured):
    plot.plot_vanilla({"circle": make_snapshot(n_experts=1)}, "x.png", epoch=7)
    (ax,) = captured[0].axes
    assert ax.get_title() == "circle, vanilla AE, epoch 7"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Input", "Predicted"]


def test_plot_grid_functions_writes_png(tmp_path):
    grid = {(name, e): make_snapshot(n_experts=e)
            for name in ("circle", "figure8", "spiral") for e in (1, 2, 4, 8)}
    path = tmp_path / "sub" / "functions.png"  # missing folders are created
    assert plot.plot_grid_functions(grid, path) == path
    check_png(path, 2000, 1500)


def test_plot_grid_functions_layout(captured):
    grid = {(name, e): make_snapshot(n_experts=e) for name in ("spiral", "circle") for e in (4, 1)}
    plot.plot_grid_functions(grid, "x.png", reconstruction="x_hard")
    fig = captured[0]
    assert tuple(fig.get_size_inches()) == (10, 10)
    titles = [ax.get_title() for ax in fig.axes]
    # rows in insertion order, columns by expert count
    assert titles == ["spiral, 1 Experts", "spiral, 4 Experts", "circle, 1 Experts",
                      "circle, 4 Experts"]
    assert all(ax.get_aspect() == 1.0 for ax in fig.axes)


def test_plot_grid_epochs_sorted_rows(captured):
    grid = {(ep, e): make_snapshot(n_experts=e) for ep in (3, 1) for e in (2, 1)}
    plot.plot_grid_epochs(grid, "x.png")
    assert [ax.get_title() for ax in captured[0].axes] == [
        "Epoch 1, 1 Experts", "Epoch 1, 2 Experts", "Epoch 3, 1 Experts", "Epoch 3, 2 Experts"]


def test_plot_grid_epochs_png(tmp_path):
    path = tmp_path / "epochs.png"
    plot.plot_grid_epochs({(1, 2): make_snapshot(n_experts=2)}, path, name="circle")
    check_png(path, 500, 500)


def test_draw_panel_legend_labels():
    ax = Figure().add_subplot()
    labels = plot._draw_panel(ax, make_snapshot(n_experts=2), "x_soft")
    assert labels == ["Input", "Predicted Expert 0", "Predicted Expert 1"]
    # one scatter per colour group and one LineCollection of every 10th point, not per-point
    assert len(ax.collections) == 4 and len(ax.lines) == 0
    assert len(ax.collections[-1].get_segments()) == 20


def test_legend_lists_unused_experts_up_to_the_largest_chart():
    snap = make_snapshot(n_experts=3)
    snap["chart"] = np.where(snap["chart"] == 1, 0, snap["chart"])  # expert 1 unused
    labels = plot._draw_panel(Figure().add_subplot(), snap)
    assert labels == ["Input"] + [f"Predicted Expert {i}" for i in range(3)]


def test_legend_is_moved_off_the_points():
    fig = Figure(figsize=(5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plot._draw_panel(ax, make_snapshot(n=400, n_experts=2), "x_soft")
    plot._place_legends(fig)
    fig.canvas.draw()
    box = ax.get_legend().get_window_extent()
    pts = np.concatenate([c.get_offset_transform().transform(c.get_offsets())
                          for c in ax.collections[:3]])
    assert not np.any([box.contains(x, y) for x, y in pts])


def test_3d_inputs_use_3d_axes(captured):
    grid = {("helix", e): make_snapshot(d=3, n_experts=e) for e in (1, 2)}
    plot.plot_grid_functions(grid, "x.png")
    plot.plot_charts(grid, "y.png")
    assert [ax.name for ax in captured[0].axes] == ["3d", "3d"]
    assert [ax.name for ax in captured[1].axes] == ["3d", "rectilinear"] * 2


def test_3d_and_high_dimensional_pngs(tmp_path):
    grid = {("helix", 2): make_snapshot(d=3, n_experts=2),
            ("circle64", 2): make_snapshot(d=64, n_experts=2)}
    check_png(plot.plot_grid_functions(grid, tmp_path / "f.png"), 500, 1000)
    check_png(plot.plot_charts(grid, tmp_path / "c.png"), 1200, 1000)


def test_pca_titles_and_isometry(captured):
    snap = make_snapshot(d=64, n_experts=2)
    plot.plot_grid_functions({("circle64", 2): snap}, "x.png")
    assert captured[0].axes[0].get_title() == "circle64, 2 Experts (PCA)"
    # the data lie in a plane, so the top-2 projection keeps every distance
    project, dim, suffix = plot._projector(snap["inputs"])
    p = project(snap["inputs"])
    assert (dim, suffix, p.shape) == (2, " (PCA)", (200, 2))
    np.testing.assert_allclose(np.linalg.norm(p - p[0], axis=1),
                               np.linalg.norm(snap["inputs"] - snap["inputs"][0], axis=1),
                               atol=1e-9)


def test_plot_charts_writes_png(tmp_path):
    path = tmp_path / "charts.png"
    assert plot.plot_charts({("circle", 4): make_snapshot(n_experts=4)}, path) == path
    check_png(path, 1200, 500)


def test_plot_charts_panels(captured):
    grid = {("circle", 2): make_snapshot(n_experts=2),
            ("noT", 2): make_snapshot(n_experts=2, with_t=False)}
    plot.plot_charts(grid, "x.png")
    left, right, _, right_no_t = captured[0].axes
    assert left.get_title() == "circle, 2 experts: hard reconstruction"
    assert right.get_title() == "circle, 2 experts: chart coordinate z vs t"
    assert not left.lines and not any(type(c).__name__ == "LineCollection"
                                      for c in left.collections)
    # z is each point's coordinate in its own chart: latents[chart[i], i, 0]
    snap = grid["circle", 2]
    z = np.concatenate([c.get_offsets()[:, 1] for c in right.collections])
    expected = snap["latents"][snap["chart"], np.arange(200), 0]
    np.testing.assert_allclose(np.sort(z), np.sort(expected))
    assert right_no_t.get_xlabel() == "point index"
    np.testing.assert_array_equal(right_no_t.collections[0].get_offsets()[:, 0], np.arange(100))


@pytest.mark.parametrize("fn", [plot.plot_grid_functions, plot.plot_grid_epochs,
                                plot.plot_charts, lambda g, p: plot.plot_vanilla(g, p, 1)])
def test_empty_input_raises(fn, tmp_path):
    with pytest.raises(ValueError):
        fn({}, tmp_path / "x.png")
