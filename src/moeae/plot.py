"""Figures of trained Mixture-of-Experts autoencoders.

:func:`plot_run` and :func:`plot_estimator` draw one fitted atlas with :func:`plot_atlas` (what
``moeae plot`` writes): the hard reconstruction coloured by chart, each chart's coordinate, and
the training loss. The seed study's figures (``moeae reproduce``) come from the other functions.

:func:`plot_atlas` and the study's figures take *snapshots*: dicts of numpy arrays for one
model on ``n`` test points (per model, as :func:`moeae.training.evaluate` returns them):
``inputs``, ``x_soft``, ``x_hard`` (n, d); ``chart`` (n,) int, the most probable expert;
``probs`` (n, E); ``expert_outputs`` (E, n, d); ``latents`` (E, n, k); optionally ``t`` (n,),
the curve parameter.

Points are drawn in 2-D for ``d == 2``, on 3-D axes for ``d == 3`` and on the first two principal
components of ``inputs`` for ``d > 3`` (the title then ends in " (PCA)"). Each function writes a
figure at dpi 100 (PNG, or PDF/SVG by the file's suffix), atomically, and returns ``path``.

Figures are built on :class:`matplotlib.figure.Figure` directly rather than through pyplot, so
the module never selects a backend, leaves an interactive one alone and keeps no open figures.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection, PathCollection
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .atomic import atomic_write_bytes
from .metrics import fvu

__all__ = ["plot_atlas", "plot_estimator", "plot_run", "plot_vanilla", "plot_grid_functions",
           "plot_grid_epochs", "plot_charts"]

FORMATS = ("png", "pdf", "svg")  # figure files by suffix

_LINE_STRIDE = 10  # a grey line from every 10th input to its reconstruction, as the reference
# matplotlib's candidate order for loc="best" (codes 1 to 10, less "right" = "center right")
_Loc = Literal["upper right", "upper left", "lower left", "lower right", "center right",
               "center left", "lower center", "upper center", "center"]
_BEST_ORDER: tuple[_Loc, ...] = get_args(_Loc)


def _projector(inputs: np.ndarray):
    """Map ``(m, d)`` arrays to the drawn coordinates, given ``inputs`` (n, d).

    Returns ``(project, dim, suffix)``: ``dim`` is 2 or 3, ``suffix`` is " (PCA)" when ``d > 3``.
    """
    d = inputs.shape[1]
    if d in (2, 3):
        return (lambda a: np.asarray(a)), d, ""
    if d == 1:
        return (lambda a: np.column_stack([a[:, 0], np.zeros(len(a))])), 2, ""
    mean = inputs.mean(axis=0)
    centred = inputs - mean
    # SVD of the (d, d) scatter matrix, not of the (n, d) data: same leading directions, and
    # the big LAPACK call's OpenBLAS threads stalled for ~1 s a call on a busy 2-core machine.
    basis = np.linalg.svd(centred.T @ centred, hermitian=True)[0][:, :2]  # (d, 2)
    # Fix each component's sign (largest loading positive) so reruns don't mirror the plot.
    basis *= np.sign(basis[np.abs(basis).argmax(axis=0), [0, 1]])
    return (lambda a: (np.asarray(a) - mean) @ basis), 2, " (PCA)"


def _add_axes(fig: Figure, rows: int, cols: int, index: int, snap: dict):
    projection = "3d" if np.shape(snap["inputs"])[1] == 3 else None
    return fig.add_subplot(rows, cols, index, projection=projection)


def _scatter(ax, pts: np.ndarray, **kw):
    return ax.scatter(*pts.T, **kw)  # (x, y) on 2-D axes, (xs, ys, zs) on 3-D axes


def _chart_groups(chart: np.ndarray):
    """Yield ``(i, mask)`` for every expert ``i`` from 0 to ``max(chart)``, empty ones included.

    The reference legends list every index up to the largest used one, even unused experts.
    """
    chart = np.asarray(chart).astype(int)
    for i in range(int(chart.max()) + 1 if chart.size else 0):
        yield i, chart == i


def _draw_panel(ax, snap: dict, reconstruction: str = "x_soft", title: str = "",
                by_chart: bool = True) -> list[str]:
    """Draw inputs, a reconstruction and input-to-reconstruction lines on one axes.

    Parameters
    ----------
    ax : matplotlib Axes, 2-D, or 3-D when ``snap["inputs"]`` has 3 columns.
    snap : snapshot dict; uses ``inputs`` (n, d), ``snap[reconstruction]`` (n, d) and, when
        ``by_chart``, ``chart`` (n,).
    reconstruction : key of the reconstruction to draw, ``"x_soft"`` or ``"x_hard"``.
    title : panel title; " (PCA)" is appended when ``d > 3``.
    by_chart : colour the reconstruction by chart (expert ``i`` in ``C{i+1}``, labelled
        "Predicted Expert i") instead of one orange group labelled "Predicted".

    Returns
    -------
    list[str] : the legend labels, in order.
    """
    project, dim, suffix = _projector(snap["inputs"])
    inp, rec = project(snap["inputs"]), project(snap[reconstruction])
    _scatter(ax, inp, color="C0", label="Input")
    if by_chart:
        for i, mask in _chart_groups(snap["chart"]):
            _scatter(ax, rec[mask], color=f"C{i + 1}", label=f"Predicted Expert {i}")
    else:
        _scatter(ax, rec, color="C1", label="Predicted")
    if dim == 2:
        segments = np.stack([inp[::_LINE_STRIDE], rec[::_LINE_STRIDE]], axis=1)  # (m, 2, 2)
        # zorder 2 puts the lines above the points, as plt.plot did in the reference.
        ax.add_collection(LineCollection(list(segments), colors="black", alpha=0.1, zorder=2))
        ax.set_aspect("equal")
        # at most ~3 ticks per axis: tick labels are most of a panel's drawing time (the 20-panel
        # epochs grid: ~2.0 s of CPU against ~2.5-3.0 s with matplotlib's default ticks)
        ax.locator_params(nbins=3)
    ax.set_title(title + suffix)
    return [t.get_text() for t in _legend(ax).get_texts()]


def _legend(ax, **kw):
    # A placeholder spot in 2-D: _save moves the legend to the emptiest one. On 3-D axes the
    # upper left corner is clear of the z tick labels.
    return ax.legend(loc="upper left" if ax.name == "3d" else "upper right", **kw)


def _place_legends(fig: Figure) -> None:
    """Move each 2-D legend to the first of matplotlib's "best" spots covering fewest points.

    loc="best" does the same search, but re-collects every point as a list of rows for each of
    the 9 candidates on every layout and draw pass (~25 ms a panel); this runs once, vectorised.
    """
    renderer = cast(FigureCanvasAgg, fig.canvas).get_renderer()
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is None or ax.name == "3d":
            continue
        ax.apply_aspect()  # the final axes box, as drawn
        offsets = [c.get_offset_transform().transform(c.get_offsets())
                   for c in ax.collections if isinstance(c, PathCollection)]
        pts = np.concatenate(offsets) if offsets else np.zeros((0, 2))
        w, h = leg.get_window_extent(renderer).size
        pad = leg.borderaxespad * renderer.points_to_pixels(leg.prop.get_size_in_points())
        x0, y0, x1, y1 = ax.bbox.padded(-pad).extents
        xs = {"left": x0, "center": (x0 + x1 - w) / 2, "right": x1 - w}
        ys = {"lower": y0, "center": (y0 + y1 - h) / 2, "upper": y1 - h}
        best, best_count = _BEST_ORDER[0], len(pts) + 1
        for loc in _BEST_ORDER:
            vert, _, horiz = loc.rpartition(" ")
            x, y = xs[horiz], ys[vert or "center"]
            count = int(np.count_nonzero((pts[:, 0] > x) & (pts[:, 0] < x + w)
                                     & (pts[:, 1] > y) & (pts[:, 1] < y + h)))
            if count < best_count:
                best, best_count = loc, count
            if count == 0:
                break
        if hasattr(leg, "set_loc"):
            leg.set_loc(best)
        else:  # matplotlib 3.7
            leg._loc = leg.codes[best]  # type: ignore[attr-defined]  # private before 3.8


# left, right, bottom, top margins and the gaps between panels, in inches
_MARGINS = (0.6, 0.2, 0.4, 0.4, 0.75, 0.75)  # tick labels and one-line titles
_LABELLED_MARGINS = (0.7, 0.3, 0.6, 0.6, 1.3, 0.75)  # also axis labels, two-line titles


def _fixed_layout(fig: Figure, margins: tuple[float, ...] = _MARGINS) -> None:
    """Margins in inches for tick labels and titles, instead of a tight layout: measuring
    every tick label's extent took 1.7 s of the 20-panel figure's 6.6 s."""
    W, H = fig.get_size_inches()
    spec = fig.axes[0].get_subplotspec()
    assert spec is not None, "figures here are grids of subplots"
    rows, cols = spec.get_gridspec().get_geometry()
    left, right, bottom, top, gap_w, gap_h = margins
    panel_w = (W - left - right - gap_w * (cols - 1)) / cols
    panel_h = (H - bottom - top - gap_h * (rows - 1)) / rows
    fig.subplots_adjust(left=left / W, right=1 - right / W, bottom=bottom / H, top=1 - top / H,
                        wspace=gap_w / panel_w, hspace=gap_h / panel_h)


def _format(path) -> str:
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"{path}: unsupported figure type {Path(path).suffix!r}; use "
                         f"{', '.join('.' + f for f in FORMATS)}")
    return fmt


def _save(fig: Figure, path, margins: tuple[float, ...] = _MARGINS):
    fmt = _format(path)
    FigureCanvasAgg(fig)
    _fixed_layout(fig, margins)
    _place_legends(fig)
    buf = io.BytesIO()
    # zlib level 1: a third of the default level's encoding time for a slightly larger file
    extra: dict[str, Any] = {"pil_kwargs": {"compress_level": 1}} if fmt == "png" else {}
    fig.savefig(buf, format=fmt, dpi=100, **extra)
    atomic_write_bytes(path, buf.getvalue())  # an old figure stays whole if drawing fails
    return path


def _grid(grid: dict, row_keys: list, title_fmt: str, path, reconstruction: str):
    """Draw ``grid[row, E]`` in rows ``row_keys`` x sorted ``E`` columns; missing cells empty."""
    if not grid:
        raise ValueError("grid is empty")
    cols = sorted({e for _, e in grid})
    fig = Figure(figsize=(5 * len(cols), 5 * len(row_keys)))
    for r, key in enumerate(row_keys):
        for c, n_exp in enumerate(cols):
            if (key, n_exp) in grid:
                snap = grid[key, n_exp]
                ax = _add_axes(fig, len(row_keys), len(cols), r * len(cols) + c + 1, snap)
                _draw_panel(ax, snap, reconstruction, title_fmt.format(key, n_exp))
    return _save(fig, path)


def plot_vanilla(snapshots: dict[str, dict], path: str | PathLike, epoch: int):
    """Soft reconstructions of vanilla (one-expert) autoencoders, one panel per data set.

    Parameters
    ----------
    snapshots : ``{name: snapshot}``; uses ``inputs`` and ``x_soft``, both (n, d).
    path : PNG to write; figure 15 x 5 inches, 1 row x ``len(snapshots)`` columns.
    epoch : shown in the titles "{name}, vanilla AE, epoch {epoch}".
    """
    if not snapshots:
        raise ValueError("snapshots is empty")
    fig = Figure(figsize=(15, 5))
    for j, (name, snap) in enumerate(snapshots.items()):
        ax = _add_axes(fig, 1, len(snapshots), j + 1, snap)
        _draw_panel(ax, snap, "x_soft", f"{name}, vanilla AE, epoch {epoch}", by_chart=False)
    return _save(fig, path)


def plot_grid_functions(grid: dict[tuple[str, int], dict], path: str | PathLike,
                        reconstruction: str = "x_soft"):
    """Reconstructions coloured by chart: rows are data sets, columns expert counts.

    Parameters
    ----------
    grid : ``{(name, E): snapshot}``; rows follow the first appearance of each name, columns
        the sorted ``E``. Uses ``inputs``, ``snapshot[reconstruction]`` (n, d), ``chart`` (n,).
    path : PNG to write; figure ``5 * cols`` x ``5 * rows`` inches.
    reconstruction : ``"x_soft"`` (default) or ``"x_hard"``.
    """
    names = list(dict.fromkeys(name for name, _ in grid))
    return _grid(grid, names, "{}, {} Experts", path, reconstruction)


def plot_grid_epochs(grid: dict[tuple[int, int], dict], path: str | PathLike,
                     name: str = "circle"):
    """Soft reconstructions coloured by chart of one data set: rows epochs, columns E.

    Parameters
    ----------
    grid : ``{(epoch, E): snapshot}``; rows are the sorted epochs, columns the sorted ``E``.
    path : PNG to write; figure ``5 * cols`` x ``5 * rows`` inches.
    name : the data set, for the caller's records; the titles read "Epoch {epoch}, {E} Experts"
        as in the reference.
    """
    epochs = sorted({ep for ep, _ in grid})
    return _grid(grid, epochs, "Epoch {}, {} Experts", path, "x_soft")


def plot_charts(grid: dict[tuple[str, int], dict], path: str | PathLike):
    """Hard reconstructions and chart coordinates, one row of two panels per ``(name, E)``.

    Left: ``x_hard`` (n, d) as points coloured by ``chart`` (n,), no lines, so a chart boundary
    where the reconstruction jumps shows as a gap; inputs in light grey underneath. Right: the
    chart coordinate ``z[i] = latents[chart[i], i, 0]`` against ``t`` (n,), or against the point
    index when the snapshot has no ``t``.

    Parameters
    ----------
    grid : ``{(name, E): snapshot}``, drawn in insertion order.
    path : PNG to write; figure 12 x ``5 * len(grid)`` inches.
    """
    if not grid:
        raise ValueError("grid is empty")
    fig = Figure(figsize=(12, 5 * len(grid)))
    for r, ((name, n_exp), snap) in enumerate(grid.items()):
        project, dim, suffix = _projector(snap["inputs"])
        chart = np.asarray(snap["chart"]).astype(int)
        n = chart.shape[0]
        ax = _add_axes(fig, len(grid), 2, 2 * r + 1, snap)
        _scatter(ax, project(snap["inputs"]), color="0.85", s=16, label="Input")
        hard = project(snap["x_hard"])
        for i, mask in _chart_groups(chart):
            _scatter(ax, hard[mask], color=f"C{i + 1}", s=8, label=f"Expert {i}")
        if dim == 2:
            ax.set_aspect("equal")
        ax.set_title(f"{name}, {n_exp} experts: hard reconstruction{suffix}")
        _legend(ax, markerscale=2)

        z = np.asarray(snap["latents"])[chart, np.arange(n), 0]
        t = snap.get("t")
        # Surfaces carry t as (n, 2); the first coordinate still orders a curve-like plot.
        x = np.arange(n) if t is None else np.asarray(t).reshape(n, -1)[:, 0]
        ax = fig.add_subplot(len(grid), 2, 2 * r + 2)
        for i, mask in _chart_groups(chart):
            ax.scatter(x[mask], z[mask], color=f"C{i + 1}", s=8)
        against = "point index" if t is None else "t"
        ax.set_xlabel(against)
        ax.set_ylabel("chart coordinate z")
        ax.set_title(f"{name}, {n_exp} experts: chart coordinate z vs {against}")
    return _save(fig, path)


# -- one fitted atlas (``moeae plot``) ----------------------------------------------------------
def plot_atlas(snapshot: dict[str, Any], path: str | PathLike,
               loss: Sequence[float] | None = None, title: str = "atlas"):
    """Draw one fitted atlas in three panels and write it to ``path``.

    Left: the hard reconstruction ``x_hard`` coloured by ``chart`` over the inputs in grey (on
    3-D axes for 3 features, on the first two principal components above 3). Middle: each
    point's chart coordinate ``z0`` against the true parameter ``t`` when the snapshot has a
    1-D ``t``, else drawn on the inputs as a colour, so a chart shows as one smooth gradient and
    a chart boundary as a jump. Right: the training loss per epoch.

    Parameters
    ----------
    snapshot : dict
        One model's outputs on ``n`` points (see the module docstring); uses ``inputs``,
        ``x_hard`` (n, d), ``chart`` (n,), ``latents`` (E, n, k) and optionally ``t`` (n,).
    path : str or PathLike
        Figure to write, 15 x 5 inches at dpi 100; ``.png``, ``.pdf`` or ``.svg``.
    loss : sequence of float, optional
        Training loss per epoch; an empty or missing history leaves the panel with a note.
    title : str, default="atlas"
        What was fitted, for the first panel's title.

    Returns
    -------
    str or PathLike
        ``path``.
    """
    _format(path)  # an unsupported suffix fails before any drawing
    inputs = np.asarray(snapshot["inputs"])
    chart = np.asarray(snapshot["chart"]).astype(int)
    n = chart.shape[0]
    latents = np.asarray(snapshot["latents"])
    z = latents[chart, np.arange(n), 0]  # (n,): each point's first coordinate in its chart
    project, dim, suffix = _projector(inputs)
    fig = Figure(figsize=(15, 5))

    ax = _add_axes(fig, 1, 3, 1, snapshot)
    drawn = project(inputs)
    _scatter(ax, drawn, color="0.8", s=10, label="input")
    hard = project(snapshot["x_hard"])
    for i, mask in _chart_groups(chart):
        _scatter(ax, hard[mask], color=f"C{i + 1}", s=6, label=f"chart {i} ({mask.sum()})")
    if dim == 3:
        ax.computed_zorder = False  # draw charts over the grey inputs, not sorted by depth
    _few_ticks(ax, dim)
    ax.set_title(f"{title}: hard reconstruction{suffix}\n"
                 f"FVU {fvu(inputs, snapshot['x_hard']):.2g}, {len(np.unique(chart))} charts "
                 "used", fontsize=10)
    _legend(ax, markerscale=2, fontsize=8)

    t = snapshot.get("t")
    k = latents.shape[-1]
    if t is not None and np.ndim(t) == 1:
        ax = fig.add_subplot(1, 3, 2)
        for i, mask in _chart_groups(chart):
            ax.scatter(np.asarray(t)[mask], z[mask], color=f"C{i + 1}", s=6)
        ax.set_xlabel("t (the true parameter)")
        ax.set_ylabel("chart coordinate z" if k == 1 else "chart coordinate z0")
        ax.set_title("each chart's coordinate against t", fontsize=10)
    else:
        ax = _add_axes(fig, 1, 3, 2, snapshot)
        dots = _scatter(ax, drawn, c=z, cmap="viridis", s=6)
        _few_ticks(ax, dim)
        # an inset moves with the panel, unlike fig.colorbar; on 3-D axes the z tick labels
        # take the right side, and the upper left corner is free
        box, side = ([0.03, 0.92, 0.35, 0.03], "horizontal") if dim == 3 else \
            ([1.03, 0.1, 0.03, 0.8], "vertical")
        bar = fig.colorbar(dots, cax=ax.inset_axes(box), orientation=side,
                           ticks=MaxNLocator(3 if dim == 3 else 4))
        bar.ax.tick_params(labelsize=8)
        name = "z" if k == 1 else f"z0 (of {k})"
        ax.set_title(f"chart coordinate {name} on the inputs{suffix}", fontsize=10)

    ax = fig.add_subplot(1, 3, 3)
    history = [float(v) for v in (loss if loss is not None else [])]
    if history:
        epochs = np.arange(1, len(history) + 1)
        ax.plot(epochs, history, color="C0", marker="." if len(history) < 30 else None)
        if min(history) > 0:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(f"training loss (last {history[-1]:.3g})", fontsize=10)
    else:
        ax.text(0.5, 0.5, "no training history", ha="center", transform=ax.transAxes)
        ax.set_title("training loss", fontsize=10)
    return _save(fig, path, _LABELLED_MARGINS)


def _few_ticks(ax, dim: int) -> None:
    """Equal scales in 2-D; at most ~4 ticks per axis, so 3-D tick labels do not collide."""
    if dim == 2:
        ax.set_aspect("equal")
        ax.locator_params(nbins=4)
        return
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.set_major_locator(MaxNLocator(4))
    ax.tick_params(labelsize=8)


def plot_estimator(estimator, X, path: str | PathLike, t=None, title: str = "atlas"):
    """Draw a fitted :class:`~moeae.MoEAutoencoder` on ``X`` with :func:`plot_atlas`.

    Parameters
    ----------
    estimator : MoEAutoencoder
        A fitted estimator; its ``history_`` gives the loss panel.
    X : array-like of shape (n_samples, n_features)
        Points to encode and reconstruct, e.g. the training data.
    path : str or PathLike
        Figure to write (``.png``, ``.pdf`` or ``.svg``).
    t : array-like of shape (n_samples,), optional
        The true parameter of each point, when known (the datasets return it).
    title : str, default="atlas"
        What was fitted, for the first panel's title.

    Returns
    -------
    str or PathLike
        ``path``.
    """
    from sklearn.utils.validation import check_is_fitted, validate_data

    check_is_fitted(estimator)
    X = validate_data(estimator, X, dtype=np.float64, reset=False)
    snapshot = _snapshot(estimator.model_, X, t)
    return plot_atlas(snapshot, path, loss=list(estimator.history_), title=title)


def _snapshot(model, X: np.ndarray, t) -> dict[str, Any]:
    import torch

    from .run import as_population
    from .training import evaluate

    snapshot = {k: v[0] for k, v in evaluate(model, as_population(X, torch.float64)).items()}
    if t is not None:
        snapshot["t"] = np.asarray(t)
    return snapshot


def plot_run(run_dir: str | PathLike, path: str | PathLike | None = None, X=None, t=None):
    """Draw the model of a run folder (``moeae train``) with :func:`plot_atlas`.

    Parameters
    ----------
    run_dir : str or PathLike
        The run folder.
    path : str or PathLike, optional
        Figure to write (``.png``, ``.pdf`` or ``.svg``); default ``run_dir/plot.png``.
    X : array-like of shape (n_samples, n_features), optional
        Points to draw; default the run's own test set (with its parameter ``t``), else the
        training data (or the sample of it that the run evaluates on).
    t : array-like of shape (n_samples,), optional
        The true parameter of each point of ``X``, when known.

    Returns
    -------
    Path
        The figure written.
    """
    from .checkpoint import load_npz
    from .run import RunError, load_model

    run_dir = Path(run_dir)
    model, config = load_model(run_dir)
    if X is None:  # the points the run evaluates on: its test set, else (a sample of) its data
        data = load_npz(run_dir / "data.npz")
        X = next(data[k] for k in ("X_test", "X_eval", "X_train") if k in data)
        t = data.get("t_test") if t is None else t
    loss = []
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        try:
            loss = [float(r["train_loss"]) for r in json.loads(metrics.read_text())]
        except (ValueError, TypeError, KeyError) as exc:
            raise RunError(f"{metrics}: unreadable metrics ({exc!r})") from None
    info = config.get("data", {})
    name = info.get("name") or Path(info.get("file", run_dir.name)).name
    path = Path(path) if path is not None else run_dir / "plot.png"
    return plot_atlas(_snapshot(model, np.asarray(X, dtype=np.float64), t), path, loss=loss,
                      title=f"{name}, {model.cfg.n_experts} experts")

