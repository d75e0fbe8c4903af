"""Draw figures by name: the jobs a figure worker runs. Importing this module is cheap (no torch,
no matplotlib), so a caller can hand figures to a worker that has imported :mod:`moeae.plot`
without importing matplotlib itself, and the worker can unpickle the job without importing
torch (a job naming a function of :mod:`moeae.study` cost the worker a 1 s import of torch)."""

from __future__ import annotations

from .workers import fork_map

__all__ = ["draw", "draw_all", "draw_groups"]


def draw(name: str, args: tuple, kwargs: dict):
    from . import plot

    return getattr(plot, name)(*args, **kwargs)


def draw_all(jobs: list) -> None:
    for job in jobs:
        draw(*job)


def draw_groups(groups: list[list]) -> None:
    """Draw each group of figures in its own process (the first here, the rest forked):
    matplotlib is single-threaded."""
    fork_map(draw_all, groups)
