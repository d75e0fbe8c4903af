"""Figures of trained Mixture-of-Experts autoencoders on curves.

Every function takes *snapshots*: dicts of numpy arrays for one model on ``n`` test points (per
model, as :meth:`moeae.training.Trainer.evaluate` returns them): ``inputs``, ``x_soft``,
``x_hard`` (n, d); ``chart`` (n,) int, the most probable expert; ``probs`` (n, E);
``expert_outputs`` (E, n, d); ``latents`` (E, n, k); optionally ``t`` (n,), the curve parameter.

Points are drawn in 2-D for ``d == 2``, on 3-D axes for ``d == 3`` and on the first two principal
components of ``inputs`` for ``d > 3`` (the title then ends in " (PCA)"). Each function writes a
PNG at dpi 100 and returns ``path``.

Figures are built on :class:`matplotlib.figure.Figure` directly rather than through pyplot, so
the module never selects a backend, leaves an interactive one alone and keeps no open figures.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection, PathCollection
from matplotlib.figure import Figure

__all__ = ["plot_vanilla", "plot_grid_functions", "plot_grid_epochs", "plot_charts"]

_LINE_STRIDE = 10  # a grey line from every 10th input to its reconstruction, as the reference
# matplotlib's candidate order for loc="best" (codes 1 to 10, less "right" = "center right")
_BEST_ORDER = ("upper right", "upper left", "lower left", "lower right", "center right",
               "center left", "lower center", "upper center", "center")


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
        ax.add_collection(LineCollection(segments, colors="black", alpha=0.1, zorder=2))
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
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is None or ax.name == "3d":
            continue
        ax.apply_aspect()  # the final axes box, as drawn
        pts = [c.get_offset_transform().transform(c.get_offsets())
               for c in ax.collections if isinstance(c, PathCollection)]
        pts = np.concatenate(pts) if pts else np.zeros((0, 2))
        w, h = leg.get_window_extent(renderer).size
        pad = leg.borderaxespad * renderer.points_to_pixels(leg.prop.get_size_in_points())
        x0, y0, x1, y1 = ax.bbox.padded(-pad).extents
        xs = {"left": x0, "center": (x0 + x1 - w) / 2, "right": x1 - w}
        ys = {"lower": y0, "center": (y0 + y1 - h) / 2, "upper": y1 - h}
        best, best_count = None, np.inf
        for loc in _BEST_ORDER:
            vert, _, horiz = loc.rpartition(" ")
            x, y = xs[horiz], ys[vert or "center"]
            count = np.count_nonzero((pts[:, 0] > x) & (pts[:, 0] < x + w)
                                     & (pts[:, 1] > y) & (pts[:, 1] < y + h))
            if count < best_count:
                best, best_count = loc, count
            if count == 0:
                break
        if hasattr(leg, "set_loc"):
            leg.set_loc(best)
        else:  # matplotlib 3.7
            leg._loc = leg.codes[best]


def _fixed_layout(fig: Figure) -> None:
    """Margins in inches for tick labels and titles, instead of a tight layout: measuring
    every tick label's extent took 1.7 s of the 20-panel figure's 6.6 s."""
    W, H = fig.get_size_inches()
    rows, cols = fig.axes[0].get_subplotspec().get_gridspec().get_geometry()
    left, right, bottom, top, gap_w, gap_h = 0.6, 0.2, 0.4, 0.4, 0.75, 0.75  # inches
    panel_w = (W - left - right - gap_w * (cols - 1)) / cols
    panel_h = (H - bottom - top - gap_h * (rows - 1)) / rows
    fig.subplots_adjust(left=left / W, right=1 - right / W, bottom=bottom / H, top=1 - top / H,
                        wspace=gap_w / panel_w, hspace=gap_h / panel_h)


def _save(fig: Figure, path):
    FigureCanvasAgg(fig)
    _fixed_layout(fig)
    _place_legends(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # zlib level 1: a third of the default level's encoding time for a slightly larger file
    fig.savefig(path, dpi=100, pil_kwargs={"compress_level": 1})
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
