"""Figures of an atlas as a manifold: chart coordinates against arc length, and the graph of
charts with the signs of their transition maps.

Like :mod:`moeae.plot`, figures are built on :class:`matplotlib.figure.Figure` directly (no
pyplot), written as PNG at dpi 100; each function returns ``path``.
"""

from __future__ import annotations

from os import PathLike

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

__all__ = ["plot_arclength", "plot_chart_graph"]


def _arclength(X: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order of the points by t and their arc length along the curve (chords summed)."""
    order = np.argsort(t, kind="stable")
    steps = np.linalg.norm(np.diff(X[order], axis=0), axis=1)
    return order, np.r_[0.0, np.cumsum(steps)]


def plot_arclength(snaps: dict[str, dict], path: str | PathLike):
    """Chart coordinate z against arc length s along each curve, one panel per snapshot.

    Each snapshot needs ``inputs`` (n, d), ``chart`` (n,), ``latents`` (E, n, 1) and ``t``
    (n,), the curve parameter (a fine, even test grid). Each chart is drawn as its own
    points: a chart whose coordinates keep lengths is a straight line (constant speed
    ``|dz/ds|``); the speed's coefficient of variation per chart is in the legend.

    Parameters
    ----------
    snaps : ``{title: snapshot}``, drawn in insertion order.
    path : PNG to write; figure ``5 * len(snaps)`` x 4 inches.
    """
    from .geometry import speed_cv

    if not snaps:
        raise ValueError("snaps is empty")
    fig = Figure(figsize=(5 * len(snaps), 4))
    for i, (title, snap) in enumerate(snaps.items()):
        if "t" not in snap:
            raise ValueError(f"snapshot {title!r} has no curve parameter 't'")
        X, chart = np.asarray(snap["inputs"]), np.asarray(snap["chart"]).astype(int)
        z = np.asarray(snap["latents"])[chart, np.arange(len(chart))]  # (n, k)
        order, s = _arclength(X, np.asarray(snap["t"]))
        cv = speed_cv(chart, z, X, np.asarray(snap["t"]), closed=False)
        ax = fig.add_subplot(1, len(snaps), i + 1)
        for e in np.unique(chart):
            m = chart[order] == e
            label = f"chart {e}" + (f" (speed CV {cv[e]:.3f})" if e in cv else "")
            ax.scatter(s[m], z[order][m, 0], s=4, color=f"C{e + 1}", label=label)
        ax.set_xlabel("arc length s")
        ax.set_ylabel("chart coordinate z")
        ax.set_title(title)
        ax.legend(loc="best", markerscale=3, fontsize="small")
    return _save(fig, path)


def plot_chart_graph(transitions, n_charts: int, path: str | PathLike, title: str = ""):
    """The atlas as a graph: one node per chart, one edge per piece of overlap, labelled with
    the sign of its transition map's Jacobian (+ keeps orientation, - reverses it; reversing
    edges in red). Several pieces between two charts are drawn as separate arcs.

    Parameters
    ----------
    transitions : list of :class:`moeae.transitions.Transition`
    n_charts : int
    path : PNG to write (5 x 5 inches).
    title : figure title; ``orientable`` or ``non-orientable`` is appended.
    """
    from .transitions import is_orientable

    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot(1, 1, 1)
    angle = 2 * np.pi * np.arange(n_charts) / max(n_charts, 1) + np.pi / 2
    pos = np.c_[np.cos(angle), np.sin(angle)]  # (n_charts, 2) nodes on a circle
    seen: dict[tuple[int, int], int] = {}
    for t in transitions:
        key = (t.source, t.target)
        j = seen.get(key, 0)
        seen[key] = j + 1
        rad = 0.25 * ((j + 1) // 2) * (1 if j % 2 else -1)  # 0, -0.25, 0.25, -0.5, ...
        a, b = pos[t.source], pos[t.target]
        color = "C3" if t.sign < 0 else "C2"
        ax.add_patch(FancyArrowPatch(a, b, connectionstyle=f"arc3,rad={rad}",
                                     arrowstyle="-", color=color, lw=2, shrinkA=18,
                                     shrinkB=18))
        # arc3 bends towards mid + rad (dy, -dx); the curve passes half way to that point
        lx, ly = (a + b) / 2 + 0.5 * rad * np.array([(b - a)[1], -(b - a)[0]])
        ax.text(lx, ly, "+" if t.sign > 0 else "\N{MINUS SIGN}", color=color,
                ha="center", va="center", fontsize=14, fontweight="bold",
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    for e, (x, y) in enumerate(pos):
        ax.scatter([x], [y], s=900, color=f"C{e + 1}", zorder=3)
        ax.text(x, y, str(e), ha="center", va="center", color="white", fontsize=12,
                fontweight="bold", zorder=4)
    ax.set_xlim(-1.5, 1.5)
    ax.set_ylim(-1.5, 1.5)
    ax.set_aspect("equal")
    ax.axis("off")
    ori = "orientable" if is_orientable(transitions, n_charts) else "non-orientable"
    ax.set_title(f"{title}: {ori}" if title else ori)
    return _save(fig, path)


def _save(fig: Figure, path):
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path
