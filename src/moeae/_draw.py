"""Draw one figure by name: the job a figure worker runs. Importing this module is cheap, so
a caller can hand figures to workers (which have imported :mod:`moeae.plot`) without
importing matplotlib itself."""

from __future__ import annotations


def draw(name: str, args: tuple, kwargs: dict):
    from . import plot

    return getattr(plot, name)(*args, **kwargs)
