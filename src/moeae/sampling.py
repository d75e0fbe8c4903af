"""Points uniform on the learned manifold, by volume.

Each chart's *domain* is the part of its coordinate space its training codes occupy: the union
of balls of radius ``r_e`` (``reach`` x the median distance between neighbouring codes of the
chart) around them. Candidates are drawn uniformly over all domains at once (a chart with
probability proportional to its bounding box, a point uniform in the box, kept when it lies in
the domain), decoded, and accepted

- with probability ``vol_e(z) / V``, where ``vol_e = sqrt(det(J^T J))`` is the decoder's
  volume element in data units (``J`` its Jacobian, exact by :func:`moeae.geometry.stacked_jvp`)
  and ``V`` bounds it, so the accepted points have density proportional to the manifold's
  volume in every chart; and
- only when the router sends the decoded point back to the chart that made it, so a region
  two domains share (an overlap) is produced by one chart and counted once.

Dimension legend: ``E`` charts, ``n`` points, ``k`` latent width, ``d`` data width.
"""

from __future__ import annotations

import numpy as np
import torch

from .geometry import stacked_jvp
from .model import MoEAE

__all__ = ["volume_element", "ChartDomains", "sample"]


@torch.no_grad()
def volume_element(model: MoEAE, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decoded points (E, n, d) and volume elements ``sqrt(det J^T J)`` (E, n) of every chart's
    decoder at its own coordinates z (E, n, k), in data units."""
    zz = torch.as_tensor(z, dtype=model.shift.dtype, device=model.shift.device)
    k = zz.shape[-1]
    cols = []
    for i in range(k):  # one Jacobian column per basis direction
        v = torch.zeros_like(zz)
        v[..., i] = 1.0
        y, jv = stacked_jvp(model.decoder, zz, v)
        cols.append(jv)
    J = torch.stack(cols, -1) * model.scale[0, 0, 0]  # (E, n, d, k) in data units
    gram = J.transpose(-1, -2) @ J  # (E, n, k, k)
    vol = torch.linalg.det(gram).clamp_min(0.0).sqrt()
    x = y * model.scale[0] + model.shift[0]
    return x.cpu().numpy(), vol.cpu().numpy()


class ChartDomains:
    """Where each chart's training codes lie: balls around the codes, per chart.

    Parameters
    ----------
    codes : ndarray (n, 1 + k)
        Atlas codes (chart, z) of training points.
    n_charts : int
    reach : float
        Ball radius in units of the median nearest-neighbour distance between a chart's codes.
    """

    def __init__(self, codes: np.ndarray, n_charts: int, reach: float = 1.5):
        from sklearn.neighbors import NearestNeighbors

        chart = codes[:, 0].astype(int)
        self.k = codes.shape[1] - 1
        self.charts, self.trees, self.radius, self.lo, self.hi = [], [], [], [], []
        for e in range(n_charts):
            z = codes[chart == e, 1:]
            if len(z) < 3:
                continue
            nn = NearestNeighbors(n_neighbors=2).fit(z)
            r = reach * float(np.median(nn.kneighbors(z)[0][:, 1]))
            self.charts.append(e)
            self.trees.append(nn)
            self.radius.append(max(r, 1e-9))
            self.lo.append(z.min(0) - r)
            self.hi.append(z.max(0) + r)
        if not self.charts:
            raise ValueError("no chart has 3 or more training codes to sample from")
        self.box = np.array([np.prod(h - lo) for lo, h in zip(self.lo, self.hi)])

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n candidates uniform over the union of the domains (charts kept apart): charts
        (m,) and coordinates (m, k), m <= n (candidates outside a domain are dropped)."""
        which = rng.choice(len(self.charts), size=n, p=self.box / self.box.sum())
        z = np.empty((n, self.k))
        keep = np.zeros(n, dtype=bool)
        for i in range(len(self.charts)):
            idx = np.flatnonzero(which == i)
            if not len(idx):
                continue
            z[idx] = rng.uniform(self.lo[i], self.hi[i], size=(len(idx), self.k))
            dist = self.trees[i].kneighbors(z[idx], n_neighbors=1)[0][:, 0]
            keep[idx] = dist <= self.radius[i]
        charts = np.asarray(self.charts)[which]
        return charts[keep], z[keep]


def _decode_chart(model: MoEAE, chart: np.ndarray, z: np.ndarray):
    """Points (m, d) and volume elements (m,) of coordinates z (m, k) in the given charts."""
    E = model.counts[0]
    zz = np.zeros((E,) + z.shape)
    zz[:] = z  # every decoder at every point, each point keeps its own chart's result
    x, vol = volume_element(model, zz)
    rows = np.arange(len(z))
    return x[chart, rows], vol[chart, rows]


@torch.no_grad()
def _routed(model: MoEAE, X: np.ndarray) -> np.ndarray:
    x = torch.as_tensor(X, dtype=model.shift.dtype, device=model.shift.device)[None]
    return model(x).probs[0].argmax(-1).cpu().numpy()


def sample(model: MoEAE, domains: ChartDomains, n: int, rng: np.random.Generator,
           batch: int = 4096, pilot: int = 4096, max_rounds: int = 1000) -> np.ndarray:
    """n points (n, d) uniform by volume on the manifold a population-of-one model decodes."""
    chart, z = domains.draw(pilot, rng)
    _, vol = _decode_chart(model, chart, z)
    bound = 1.2 * float(vol.max()) if len(vol) else 1.0  # the largest element seen, with room
    out, have = [], 0
    for _ in range(max_rounds):
        chart, z = domains.draw(batch, rng)
        if not len(z):
            continue
        x, vol = _decode_chart(model, chart, z)
        keep = rng.uniform(size=len(vol)) * bound < vol
        keep &= _routed(model, x) == chart
        out.append(x[keep])
        have += int(keep.sum())
        if have >= n:
            return np.concatenate(out)[:n]
    raise RuntimeError(f"sampling accepted only {have} of {n} points in {max_rounds} rounds "
                       "(the router sends almost no decoded point back to its chart)")
