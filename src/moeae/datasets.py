"""Data sets with a known parametrisation.

Every generator returns ``(X, t)``: ``X`` of shape ``(n_samples, n_features)`` (float64) and the
true manifold parameter ``t`` of shape ``(n_samples,)`` for curves or ``(n_samples, 2)`` for
surfaces. Curves take ``grid=True`` for the evenly spaced parameter the seed study tests on
(``numpy.linspace`` over the closed range, as the reference code); otherwise the parameter is
drawn uniformly at random, as for the seed's training sets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DATASETS",
    "embed",
    "get_dataset",
    "load_digits",
    "make_circle",
    "make_cylinder",
    "make_figure8",
    "make_helicoid",
    "make_helix",
    "make_moebius",
    "make_shifting_picture",
    "make_s_curve",
    "make_sphere",
    "make_spiral",
    "make_swiss_roll",
    "make_torus",
    "make_trefoil",
    "make_turning_picture",
]


def check_random_state(seed) -> np.random.RandomState:
    """None, an int or a RandomState -> a RandomState, as scikit-learn's helper of that name
    (not imported from there: importing scikit-learn costs ~1.7 s that ``reproduce`` need not
    pay)."""
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.random.RandomState(seed)
    if isinstance(seed, np.random.RandomState):
        return seed
    raise ValueError(f"random_state must be None, an int or a RandomState, got {seed!r}")


def _check_common(n_samples, noise):
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)):
        raise TypeError(f"n_samples must be an int, got {type(n_samples).__name__}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise}")


def _curve(fn, lo, hi, n_samples, noise, random_state, grid):
    _check_common(n_samples, noise)
    rng = check_random_state(random_state)
    if grid:
        t = np.linspace(lo, hi, n_samples)
    else:
        t = lo + (hi - lo) * rng.uniform(size=n_samples)
    X = np.asarray(fn(t), dtype=np.float64)
    if noise > 0:
        X = X + noise * rng.standard_normal(X.shape)
    return X, t


def make_circle(n_samples=1000, *, noise=0.0, random_state=None, grid=False):
    """Unit circle ``(cos t, sin t)``, ``t`` in ``[0, 2 pi)``.

    Returns
    -------
    X : ndarray of shape (n_samples, 2)
    t : ndarray of shape (n_samples,)
    """
    return _curve(lambda t: np.stack([np.cos(t), np.sin(t)], 1), 0.0, 2 * np.pi,
                  n_samples, noise, random_state, grid)


def make_spiral(n_samples=1000, *, noise=0.0, random_state=None, grid=False):
    """Archimedean spiral ``(t cos t, t sin t)``, ``t`` in ``[0, 6 pi]`` (three turns)."""
    return _curve(lambda t: np.stack([t * np.cos(t), t * np.sin(t)], 1), 0.0, 6 * np.pi,
                  n_samples, noise, random_state, grid)


def make_figure8(n_samples=1000, *, noise=0.0, random_state=None, grid=False):
    """Lemniscate of Gerono ``(sin t, sin t cos t)``, ``t`` in ``[0, 2 pi)``.

    (The seed's pseudo-code ``(sin t, cos t)`` is a circle by mistake; its code used this curve.)
    """
    return _curve(lambda t: np.stack([np.sin(t), np.sin(t) * np.cos(t)], 1), 0.0, 2 * np.pi,
                  n_samples, noise, random_state, grid)


def make_trefoil(n_samples=1000, *, noise=0.0, random_state=None, grid=False):
    """Trefoil knot in 3-D, ``(sin t + 2 sin 2t, cos t - 2 cos 2t, -sin 3t)``, ``t`` in [0, 2 pi).

    A closed curve that no single chart can cover; scaled to roughly unit radius.
    """
    def fn(t):
        return np.stack([np.sin(t) + 2 * np.sin(2 * t), np.cos(t) - 2 * np.cos(2 * t),
                         -np.sin(3 * t)], 1) / 3.0
    return _curve(fn, 0.0, 2 * np.pi, n_samples, noise, random_state, grid)


def make_sphere(n_samples=1000, *, noise=0.0, random_state=None):
    """Points uniform on the unit sphere in 3-D.

    Returns ``t`` of shape (n_samples, 2): polar angle in ``[0, pi]`` and azimuth in ``[0, 2 pi)``.
    """
    _check_common(n_samples, noise)
    rng = check_random_state(random_state)
    theta = np.arccos(rng.uniform(-1.0, 1.0, size=n_samples))
    phi = rng.uniform(0.0, 2 * np.pi, size=n_samples)
    X = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], 1)
    if noise > 0:
        X = X + noise * rng.standard_normal(X.shape)
    return X, np.stack([theta, phi], 1)


def make_torus(n_samples=1000, *, major_radius=2.0, minor_radius=1.0, noise=0.0,
               random_state=None):
    """Torus in 3-D with both angles drawn uniformly from ``[0, 2 pi)``.

    Returns ``t`` of shape (n_samples, 2): angle around the axis, angle around the tube.
    """
    _check_common(n_samples, noise)
    if not 0 < minor_radius < major_radius:
        raise ValueError("need 0 < minor_radius < major_radius, got "
                         f"minor_radius={minor_radius}, major_radius={major_radius}")
    rng = check_random_state(random_state)
    u = rng.uniform(0.0, 2 * np.pi, size=n_samples)
    v = rng.uniform(0.0, 2 * np.pi, size=n_samples)
    ring = major_radius + minor_radius * np.cos(v)
    X = np.stack([ring * np.cos(u), ring * np.sin(u), minor_radius * np.sin(v)], 1)
    if noise > 0:
        X = X + noise * rng.standard_normal(X.shape)
    return X, np.stack([u, v], 1)


def make_swiss_roll(n_samples=1000, *, noise=0.0, random_state=None):
    """scikit-learn's Swiss roll; ``t`` (n_samples, 2) = (roll parameter, height)."""
    from sklearn.datasets import make_swiss_roll as _sk

    _check_common(n_samples, noise)
    X, t = _sk(n_samples=n_samples, noise=noise, random_state=random_state)
    return X, np.stack([t, X[:, 1]], 1)


def make_s_curve(n_samples=1000, *, noise=0.0, random_state=None):
    """scikit-learn's S-curve; ``t`` (n_samples, 2) = (curve parameter, height)."""
    from sklearn.datasets import make_s_curve as _sk

    _check_common(n_samples, noise)
    X, t = _sk(n_samples=n_samples, noise=noise, random_state=random_state)
    return X, np.stack([t, X[:, 1]], 1)


def make_moebius(n_samples=1000, *, half_twists=1, radius=1.0, width=0.3, noise=0.0,
                 random_state=None):
    """A band around a circle whose cross-section turns ``half_twists`` half turns per loop.

    ``X = ((R + v cos(h u / 2)) cos u, (R + v cos(h u / 2)) sin u, v sin(h u / 2))`` with
    ``u`` uniform in ``[0, 2 pi)`` and ``v`` uniform in ``[-width, width]`` (uniform in the
    parameters, not in area). An odd ``h`` (1: the Moebius band) is non-orientable, an even
    one orientable; ``h = 0`` is a flat annulus.

    Returns ``t`` of shape (n_samples, 2): ``(u, v)``.
    """
    _check_common(n_samples, noise)
    if isinstance(half_twists, bool) or not isinstance(half_twists, (int, np.integer)) \
            or half_twists < 0:
        raise ValueError(f"half_twists must be an int >= 0, got {half_twists!r}")
    if not 0 < width < radius:
        raise ValueError(f"need 0 < width < radius, got width={width}, radius={radius}")
    rng = check_random_state(random_state)
    u = rng.uniform(0.0, 2 * np.pi, size=n_samples)
    v = rng.uniform(-width, width, size=n_samples)
    a = 0.5 * half_twists * u
    ring = radius + v * np.cos(a)
    X = np.stack([ring * np.cos(u), ring * np.sin(u), v * np.sin(a)], 1)
    if noise > 0:
        X = X + noise * rng.standard_normal(X.shape)
    return X, np.stack([u, v], 1)


def make_cylinder(n_samples=1000, *, radius=1.0, height=2.0, noise=0.0, random_state=None):
    """The side of a cylinder ``(R cos u, R sin u, h)``, ``u`` uniform in ``[0, 2 pi)``, ``h``
    uniform in ``[0, height]`` (uniform in area). Flat: ``(R u, h)`` are isometric coordinates.

    Returns ``t`` of shape (n_samples, 2): ``(u, h)``.
    """
    _check_common(n_samples, noise)
    if not (radius > 0 and height > 0):
        raise ValueError(f"need radius > 0 and height > 0, got radius={radius}, "
                         f"height={height}")
    rng = check_random_state(random_state)
    u = rng.uniform(0.0, 2 * np.pi, size=n_samples)
    h = rng.uniform(0.0, height, size=n_samples)
    X = np.stack([radius * np.cos(u), radius * np.sin(u), h], 1)
    if noise > 0:
        X = X + noise * rng.standard_normal(X.shape)
    return X, np.stack([u, h], 1)


def make_helix(n_samples=1000, *, turns=3.0, pitch=0.3, noise=0.0, random_state=None,
               grid=False):
    """A coil of unit radius, ``(cos t, sin t, pitch t / (2 pi))``, ``t`` in
    ``[0, 2 pi turns]``: with a small ``pitch`` its turns nearly touch (points one turn apart
    are ``pitch`` apart in space, ``2 pi`` apart along the curve)."""
    if not (turns > 0 and pitch > 0):
        raise ValueError(f"need turns > 0 and pitch > 0, got turns={turns}, pitch={pitch}")
    return _curve(lambda t: np.stack([np.cos(t), np.sin(t), pitch * t / (2 * np.pi)], 1),
                  0.0, 2 * np.pi * turns, n_samples, noise, random_state, grid)


def make_helicoid(n_samples=2000, *, turns=2.0, pitch=0.5, inner=0.5, outer=1.5, noise=0.0,
                  random_state=None):
    """A spiral ramp ``(s cos t, s sin t, pitch t / (2 pi))``, ``s`` uniform in
    ``[inner, outer]``, ``t`` uniform in ``[0, 2 pi turns]``: sheets one turn apart lie
    ``pitch`` apart. Returns ``t`` of shape (n_samples, 2): ``(t, s)``."""
    _check_common(n_samples, noise)
    if not (turns > 0 and pitch > 0 and 0 <= inner < outer):
        raise ValueError(f"need turns > 0, pitch > 0 and 0 <= inner < outer, got "
                         f"turns={turns}, pitch={pitch}, inner={inner}, outer={outer}")
    rng = check_random_state(random_state)
    t = rng.uniform(0.0, 2 * np.pi * turns, size=n_samples)
    r = rng.uniform(inner, outer, size=n_samples)
    X = np.stack([r * np.cos(t), r * np.sin(t), pitch * t / (2 * np.pi)], 1)
    if noise > 0:
        X = X + noise * rng.standard_normal(X.shape)
    return X, np.stack([t, r], 1)


def _pixels(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    return np.meshgrid(c, c, indexing="xy")


def make_turning_picture(n_samples=1000, *, size=24, noise=0.0, random_state=None,
                         grid=False):
    """A ``size`` x ``size`` picture of a bar with a dot at one end, turned through a full
    turn: a closed curve in ``R^(size^2)`` (the dot makes the turn by pi a different
    picture). Pixel values in [0, 1]; ``t`` is the angle in ``[0, 2 pi)``."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 4:
        raise ValueError(f"size must be an int >= 4, got {size!r}")
    px, py = _pixels(int(size))

    def draw(t):
        c, s = np.cos(t)[:, None, None], np.sin(t)[:, None, None]
        u, v = c * px + s * py, -s * px + c * py  # coordinates along and across the bar
        bar = np.exp(-0.5 * ((u / 0.45) ** 2 + (v / 0.1) ** 2))
        dot = np.exp(-0.5 * ((u - 0.65) ** 2 + v**2) / 0.1**2)
        return np.maximum(bar, dot).reshape(len(t), -1)
    return _curve(draw, 0.0, 2 * np.pi, n_samples, noise, random_state, grid)


def make_shifting_picture(n_samples=2000, *, size=16, noise=0.0, random_state=None):
    """A ``size`` x ``size`` picture of a round blob shifted across it in both directions, the
    picture wrapping around at its edges: a torus in ``R^(size^2)``. ``t`` (n_samples, 2): the
    blob's centre in ``[0, 1)^2``."""
    _check_common(n_samples, noise)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 4:
        raise ValueError(f"size must be an int >= 4, got {size!r}")
    rng = check_random_state(random_state)
    t = rng.uniform(0.0, 1.0, size=(n_samples, 2))
    px, py = _pixels(int(size))
    gx, gy = (px + 1) / 2, (py + 1) / 2  # pixel centres in [0, 1)

    def wrap(a):
        return (a + 0.5) % 1.0 - 0.5
    dx = wrap(gx[None] - t[:, 0, None, None])
    dy = wrap(gy[None] - t[:, 1, None, None])
    X = np.exp(-0.5 * (dx**2 + dy**2) / 0.12**2).reshape(n_samples, -1)
    if noise > 0:
        X = X + noise * rng.standard_normal(X.shape)
    return X, t


def embed(X, n_features, *, noise=0.0, random_state=None):
    """Place data isometrically into ``R^n_features`` by a random orthonormal map, plus noise.

    Distances are preserved exactly before the noise: ``X @ Q.T`` with ``Q`` of shape
    (n_features, d) having orthonormal columns (QR of a Gaussian matrix).

    Returns
    -------
    X_embedded : ndarray of shape (n_samples, n_features)
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"embed expects a 2-D array, got shape {X.shape}")
    d = X.shape[1]
    if n_features < d:
        raise ValueError(f"cannot embed {d}-D data isometrically into {n_features} dimensions")
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise}")
    rng = check_random_state(random_state)
    Q, R = np.linalg.qr(rng.standard_normal((n_features, d)))
    Q = Q * np.sign(np.diag(R))  # a unique, sign-fixed orthonormal basis
    Y = X @ Q.T
    if noise > 0:
        Y = Y + noise * rng.standard_normal(Y.shape)
    return Y


def load_digits():
    """scikit-learn's 8x8 digits (1797 x 64, values 0..16, shipped with scikit-learn).

    Returns ``(X, y)`` with the digit labels as ``y``; there is no manifold parameter.
    """
    from sklearn.datasets import load_digits as _sk

    d = _sk()
    return d.data.astype(np.float64), d.target


@dataclass(frozen=True)
class DatasetInfo:
    """A named data set for the command line and the studies."""

    make: Callable  # make(n_samples, noise=, random_state=[, grid=]) -> (X, t)
    manifold_dim: int  # intrinsic dimension: the natural latent_dim
    closed: bool  # a closed curve or surface (no single chart covers it)
    has_grid: bool  # accepts grid=True for an even test grid


DATASETS: dict[str, DatasetInfo] = {
    "circle": DatasetInfo(make_circle, 1, True, True),
    "spiral": DatasetInfo(make_spiral, 1, False, True),
    "figure8": DatasetInfo(make_figure8, 1, True, True),
    "trefoil": DatasetInfo(make_trefoil, 1, True, True),
    "sphere": DatasetInfo(make_sphere, 2, True, False),
    "torus": DatasetInfo(make_torus, 2, True, False),
    "swiss_roll": DatasetInfo(make_swiss_roll, 2, False, False),
    "cylinder": DatasetInfo(make_cylinder, 2, True, False),
    "moebius": DatasetInfo(make_moebius, 2, True, False),
    "s_curve": DatasetInfo(make_s_curve, 2, False, False),
    "helix": DatasetInfo(make_helix, 1, False, True),
    "helicoid": DatasetInfo(make_helicoid, 2, False, False),
    "turning_picture": DatasetInfo(make_turning_picture, 1, True, True),
    "shifting_picture": DatasetInfo(make_shifting_picture, 2, True, False),
}


def get_dataset(name: str) -> DatasetInfo:
    """Look up a named data set; the error lists the valid names."""
    key = name.replace("-", "_").lower()
    aliases = {"figure_8": "figure8", "swissroll": "swiss_roll", "scurve": "s_curve",
               "mobius": "moebius"}
    key = aliases.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[key]
