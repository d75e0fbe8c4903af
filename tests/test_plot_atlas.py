"""One fitted atlas as a figure: ``moeae.plot.plot_atlas``/``plot_run``/``plot_estimator`` and
``moeae plot RUN_DIR``."""

from __future__ import annotations

import json
import shutil

import matplotlib.image as mpimg
import numpy as np
import pytest
from conftest import assert_error
from matplotlib.colors import to_rgb
from test_plot import check_png, make_snapshot

from moeae import MoEAutoencoder, plot
from moeae.datasets import make_trefoil


@pytest.fixture
def captured(monkeypatch):
    """Collect the figures instead of rendering them."""
    figs = []
    monkeypatch.setattr(plot, "_save", lambda fig, path, *a: figs.append(fig) or path)
    return figs


def test_plot_atlas_writes_png(tmp_path):
    path = tmp_path / "atlas.png"
    assert plot.plot_atlas(make_snapshot(n_experts=3), path, loss=[1.0, 0.5, 0.2]) == path
    check_png(path, 1500, 500)


def test_plot_atlas_panels_show_charts_coordinates_and_loss(captured):
    snap = make_snapshot(n_experts=3)
    plot.plot_atlas(snap, "x.png", loss=[1.0, 0.5, 0.25], title="circle, 3 experts")
    left, middle, right = captured[0].axes
    assert left.get_title().startswith("circle, 3 experts: hard reconstruction\nFVU 0.01")
    # one group per chart, coloured C1, C2, ... as in the study's figures
    colours = [tuple(c.get_facecolor()[0][:3]) for c in left.collections[1:]]
    assert colours == [to_rgb(f"C{i + 1}") for i in range(3)]
    # each point's coordinate in its own chart, against the true parameter
    z = np.concatenate([c.get_offsets()[:, 1] for c in middle.collections])
    t = np.concatenate([c.get_offsets()[:, 0] for c in middle.collections])
    expected = snap["latents"][snap["chart"], np.arange(200), 0]
    np.testing.assert_allclose(np.sort(z), np.sort(expected))
    np.testing.assert_allclose(np.sort(t), np.sort(snap["t"]))
    assert middle.get_xlabel() == "t (the true parameter)"
    (line,) = right.lines
    np.testing.assert_array_equal(line.get_ydata(), [1.0, 0.5, 0.25])
    assert right.get_yscale() == "log" and right.get_title() == "training loss (last 0.25)"


def test_plot_atlas_without_t_colours_the_inputs(captured):
    snap = make_snapshot(n_experts=2, with_t=False)
    plot.plot_atlas(snap, "x.png", loss=None)
    left, middle, right = captured[0].axes
    assert middle.get_title() == "chart coordinate z on the inputs"
    assert len(middle.child_axes) == 1  # its colour bar
    (dots,) = middle.collections
    np.testing.assert_allclose(dots.get_array(), snap["latents"][snap["chart"], np.arange(200), 0])
    np.testing.assert_allclose(dots.get_offsets(), snap["inputs"])
    assert [t.get_text() for t in right.texts] == ["no training history"]


def test_plot_atlas_3d_and_pca(captured, tmp_path):
    plot.plot_atlas(make_snapshot(d=3, n_experts=2, with_t=False), "x.png", loss=[1.0])
    assert [ax.name for ax in captured[0].axes[:2]] == ["3d", "3d"]
    plot.plot_atlas(make_snapshot(d=64, n_experts=2), "y.png", loss=[1.0])
    assert captured[1].axes[0].get_title().startswith("atlas: hard reconstruction (PCA)")


def test_unsupported_suffix_and_other_formats(tmp_path):
    snap = make_snapshot(n_experts=2)
    with pytest.raises(ValueError, match=r"x\.jpg: unsupported figure type '\.jpg'"):
        plot.plot_atlas(snap, tmp_path / "x.jpg")
    assert not list(tmp_path.iterdir())
    plot.plot_atlas(snap, tmp_path / "x.svg")
    plot.plot_atlas(snap, tmp_path / "x.pdf")
    assert (tmp_path / "x.svg").read_text().lstrip().startswith("<?xml")
    assert (tmp_path / "x.pdf").read_bytes().startswith(b"%PDF")


def test_failed_drawing_keeps_the_old_figure(tmp_path, monkeypatch):
    path = tmp_path / "plot.png"
    path.write_bytes(b"an older figure")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(plot.Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plot.plot_atlas(make_snapshot(n_experts=2), path)
    assert path.read_bytes() == b"an older figure"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]  # no temporary file left


def test_plot_estimator_uses_its_history(captured):
    X, t = make_trefoil(200, random_state=0)
    est = MoEAutoencoder(n_experts=2, recipe="seed", epochs=2, width=16, depth=1,
                         random_state=0).fit(X)
    plot.plot_estimator(est, X, "x.png", t=t, title="trefoil")
    left, middle, right = captured[0].axes
    np.testing.assert_allclose(right.lines[0].get_ydata(), est.history_)
    charts = est.predict(X)
    sizes = sorted(len(c.get_offsets()) for c in left.collections[1:])
    assert sizes == sorted(np.bincount(charts, minlength=2)[:len(sizes)].tolist())
    with pytest.raises(ValueError):  # 2 features, fitted on 3
        plot.plot_estimator(est, X[:, :2], "x.png")


# -- the command line ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trefoil_run(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("plot") / "trefoil"
    res = cli("train", "--data", "trefoil", "--experts", "3", "--recipe", "seed", "--n-samples",
              "300", "--epochs", "2", "--threads", "1", "--out", out)
    assert res.returncode == 0, res
    return out


def test_moeae_plot_trefoil_writes_the_runs_png(cli, trefoil_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trefoil_run, run)
    res = cli("plot", run, "--threads", "1")
    assert res.returncode == 0 and res.stdout.strip() == f"wrote {run / 'plot.png'}", res
    check_png(run / "plot.png", 1500, 500)
    assert 20_000 < (run / "plot.png").stat().st_size < 1_000_000
    # drawn from this run: the same figure as the library draws from its folder
    plot.plot_run(run, tmp_path / "same.png")
    assert (tmp_path / "same.png").read_bytes() == (run / "plot.png").read_bytes()
    # and its charts are on it, in their colours
    rgb = mpimg.imread(run / "plot.png")[..., :3]
    charts = np.load(sorted((run / "snapshots").glob("*.npz"))[-1])["chart"]
    for i in np.unique(charts):
        near = np.abs(rgb - np.array(to_rgb(f"C{i + 1}"))).max(-1) < 0.02
        assert near.sum() > 50, f"chart {i} (C{i + 1}) not drawn"


def test_moeae_plot_data_and_out(cli, trefoil_run, tmp_path):
    X, _ = make_trefoil(150, random_state=9)
    np.save(tmp_path / "mine.npy", X)
    out = tmp_path / "figs" / "mine.png"
    res = cli("plot", trefoil_run, "--data", tmp_path / "mine.npy", "--out", out, "--threads",
              "1")
    assert res.returncode == 0, res
    check_png(out, 1500, 500)
    assert not (trefoil_run / "plot.png").exists()  # nothing written into the run
    res = cli("plot", trefoil_run, "--data", "trefoil", "--out", tmp_path / "grid.svg")
    assert res.returncode == 0 and (tmp_path / "grid.svg").stat().st_size > 10_000, res


def test_moeae_plot_errors(cli, trefoil_run, tmp_path):
    assert_error(cli("plot", tmp_path / "nope"), "nope", "not found")
    assert_error(cli("plot", trefoil_run, "--out", tmp_path / "x.jpg"), "x.jpg",
                 "unsupported figure type '.jpg'")
    np.save(tmp_path / "flat.npy", np.ones((10, 2)))
    assert_error(cli("plot", trefoil_run, "--data", tmp_path / "flat.npy"), "flat.npy",
                 "has 2 features", "expects 3")
    assert not list(tmp_path.glob("*.png")) and not (trefoil_run / "plot.png").exists()
    metrics = json.loads((trefoil_run / "metrics.json").read_text())
    assert len(metrics) == 2  # the run is untouched
