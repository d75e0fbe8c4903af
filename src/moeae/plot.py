"""Figures of trained Mixture-of-Experts autoencoders on curves.

Every function takes *snapshots*: dicts of numpy arrays for one model evaluated on ``n`` test
points, as returned per model by :meth:`moeae.training.Trainer.evaluate`:

- ``inputs`` ``(n, d)``, ``x_soft`` ``(n, d)``, ``x_hard`` ``(n, d)``;
- ``chart`` ``(n,)`` int, the most probable expert; ``probs`` ``(n, E)``;
- ``expert_outputs`` ``(E, n, d)``; ``latents`` ``(E, n, k)``;
- optionally ``t`` ``(n,)``, the true curve parameter.

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
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.layout_engine import TightLayoutEngine

__all__ = ["plot_vanilla", "plot_grid_functions", "plot_grid_epochs", "plot_charts"]

_LINE_STRIDE = 10  # a grey line from every 10th input to its reconstruction, as the reference


def _projector(inputs: np.ndarray):
    """Map ``(m, d)`` arrays to the drawn coordinates.

    Returns ``(project, dim, suffix)``: ``dim`` is 2 or 3, ``suffix`` is " (PCA)" when ``d > 3``.
    """
    d = inputs.shape[1]
    if d in (2, 3):
        return (lambda a: np.asarray(a)), d, ""
    if d == 1:
        return (lambda a: np.column_stack([a[:, 0], np.zeros(len(a))])), 2, ""
    mean = inputs.mean(axis=0)
    _, _, vt = np.linalg.svd(inputs - mean, full_matrices=False)
    basis = vt[:2].T  # (d, 2)
    return (lambda a: (np.asarray(a) - mean) @ basis), 2, " (PCA)"


def _add_axes(fig: Figure, rows: int, cols: int, index: int, dim: int):
    return fig.add_subplot(rows, cols, index, projection="3d" if dim == 3 else None)


def _scatter(ax, pts: np.ndarray, **kw):
    # pts.T unpacks to (x, y) on 2-D axes and (xs, ys, zs) on 3-D axes.
    return ax.scatter(*pts.reshape(-1, pts.shape[-1]).T, **kw)


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
    ax.set_title(title + suffix)
    return [t.get_text() for t in ax.legend().get_texts()]


def _save(fig: Figure, path):
    # TightLayoutEngine.execute adjusts the subplots once without attaching an engine to the
    # figure; fig.tight_layout() would leave one attached and make savefig lay out and draw twice.
    TightLayoutEngine().execute(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _grid(cells: list[list[tuple[str, dict]]], path, reconstruction: str):
    """Draw a rows x cols grid of ``(title, snapshot)`` panels (None for a missing cell)."""
    rows, cols = len(cells), max(len(r) for r in cells)
    fig = Figure(figsize=(5 * cols, 5 * rows))
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            if cell is None:
                continue
            title, snap = cell
            ax = _add_axes(fig, rows, cols, r * cols + c + 1, _projector(snap["inputs"])[1])
            _draw_panel(ax, snap, reconstruction, title)
    return _save(fig, path)


def _grid_cells(grid: dict, row_keys, title_fmt: str):
    cols = sorted({e for _, e in grid})
    return [[(title_fmt.format(r, e), grid[r, e]) if (r, e) in grid else None for e in cols]
            for r in row_keys]


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
        ax = _add_axes(fig, 1, len(snapshots), j + 1, _projector(snap["inputs"])[1])
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
    if not grid:
        raise ValueError("grid is empty")
    names = list(dict.fromkeys(name for name, _ in grid))
    return _grid(_grid_cells(grid, names, "{}, {} Experts"), path, reconstruction)


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
    if not grid:
        raise ValueError("grid is empty")
    epochs = sorted({ep for ep, _ in grid})
    return _grid(_grid_cells(grid, epochs, "Epoch {}, {} Experts"), path, "x_soft")


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
        ax = _add_axes(fig, len(grid), 2, 2 * r + 1, dim)
        _scatter(ax, project(snap["inputs"]), color="0.85", s=16, label="Input")
        hard = project(snap["x_hard"])
        for i, mask in _chart_groups(chart):
            _scatter(ax, hard[mask], color=f"C{i + 1}", s=8, label=f"Expert {i}")
        if dim == 2:
            ax.set_aspect("equal")
        ax.set_title(f"{name}, {n_exp} experts: hard reconstruction{suffix}")
        ax.legend(markerscale=2)

        z = np.asarray(snap["latents"])[chart, np.arange(n), 0]
        t = snap.get("t")
        # Surfaces carry t as (n, 2); the first coordinate still orders a curve-like plot.
        x = np.arange(n) if t is None else np.asarray(t).reshape(n, -1)[:, 0]
        ax = fig.add_subplot(len(grid), 2, 2 * r + 2)
        for i, mask in _chart_groups(chart):
            ax.scatter(x[mask], z[mask], color=f"C{i + 1}", s=8)
        ax.set_xlabel("point index" if t is None else "t")
        ax.set_ylabel("chart coordinate z")
        ax.set_title(f"{name}, {n_exp} experts: chart coordinate z vs t")
    return _save(fig, path)
