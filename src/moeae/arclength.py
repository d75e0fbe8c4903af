"""Arc-length charts for curves: codes that keep lengths exactly.

A curve's chart is isometric when its code moves at constant speed along the curve. After
training, each chart's decoder is traced over the codes its points use, and the arc length
along the traced curve, as a function of the network's code ``u``, becomes a monotone table
``s(u)`` (:func:`tables`). Beyond its ends a chart goes on straight, along its end segment, for
``EXTEND`` of its code range (:func:`extended`): past its last points the decoder is untrained
and may hook back (an open curve's end, or a test point a little beyond the training sample's),
where a straight end continues the curve. A point is then coded by *projection*
(:func:`project`):

- every chart's encoder gives a first code, refined by Gauss-Newton steps to the nearest point
  of that chart's curve (within its traced range, or on its straight ends);
- the chart whose curve passes nearest the point is its chart (the router's, where its curve
  passes within ``TIE`` knots of the nearest);
- its code is the arc length ``s(u)`` of that nearest point, in data units, smoothed
  (:func:`smooth`): a Gaussian-weighted mean of arc length along the traced curve near it, the
  kernel as wide as the point's distance from the curve and at least ``SMOOTH`` knots, where
  that mean decodes near the point (``KEEP``; not across the tip of a cusp).

The ``best`` recipe codes every curve so (``TrainConfig.arc_length``): the decoder's nearest
point reconstructs 2-7 times closer than the decoder at the encoder's code (docs/recipes.md,
session 16), at about six times the encoding time.

Decoding inverts the table (``u(s)``) and runs the decoder (straight beyond its ends).
Measured on one fit of the figure-8 (2 charts, seed 0, 1000 training points, 1000-point test
grid): the worst chart's speed CV is
0.042 with projection and the nearest chart, and 0.007 smoothed; the encoder's own codes put
through the table gave about twice the projection's CV, and unmapped about five times. A
piecewise-linear (ReLU) encoder's speed changes from one linear piece to the next, which
projection does not see; where the traced curve bends away from the data (a kink of the
decoder, 0.01-0.02 off) the nearest point jumps, which the kernel spreads out (the same fits,
seeds 0-19: worst 0.135 -> 0.031). At a cusp the mean runs across the tip, both sides of it
near the point, and decodes away from it (an epicycloid with 3 cusps, seed 2, hard FVU 1.1e-4
smoothed, 1.9e-5 not), hence ``KEEP``. The reparametrisation is exact, so curves need no isometry
term in training (:func:`moeae.config.isometric_overrides`).

Dimension legend: ``M`` models, ``E`` experts per model, ``G`` experts of the population,
``B`` points, ``T`` knots of a table, ``d`` data width.
"""

from __future__ import annotations

import torch

from .geometry import stacked_jvp

__all__ = ["KNOTS", "EXTEND", "STEPS", "SMOOTH", "KEEP", "SLACK", "TIE", "interp", "tables",
           "project", "smooth", "knot_length", "raw_codes", "network_codes", "reach", "ends",
           "extended"]

KNOTS = 1025  #: knots of each chart's table (the decoder is traced at these codes)
#: Each straight end reaches this fraction of the chart's code range beyond its points. The
#: decoder traced as far beyond (session 16) hooked back past the spiral's outer end, where a
#: test point beyond the training sample's last one was coded at the hook (one pair at speed
#: 0.02-0.3: a chart CV of 0.07-0.1), and at its centre the encoders' folded codes left the
#: decoder short of the end. 20 seeds, worst chart speed CV <= 0.05: spiral 12 -> 19, figure-8
#: 19 -> 20, circle 20 -> 20 (docs/recipes.md, session 17)
EXTEND = 0.05
STEPS = 3  #: Gauss-Newton steps of a projection (3 and 20 gave the same codes to 4 digits of
#:            the speed CV and hard FVU on the circle, figure-8 and spiral, seed 0; 2 the same
#:            on their grids, but an epicycloid's points (seed 1) 18 of 5000 in another chart,
#:            one 0.07 further from its reconstruction, and noisy points further: session 18)
SMOOTH = 4.0  #: the least width of the smoothing kernel, in knots (the chart's length / 256)
#: A smoothed code is kept where it decodes at most sqrt(KEEP) times as far from the point as
#: its nearest point does, plus sqrt(SLACK) knots; else the nearest point's code. Beside a kink
#: the mean decodes within 1.5 knots more (figure-8, seeds 1 and 6); across a cusp's tip up to
#: 6 knots (epicycloid seed 2, astroid seed 1)
KEEP, SLACK = 4.0, 4.0
#: Where a chart's curve passes within TIE knots (in distance, squared) of the nearest chart's,
#: the router's chart keeps the point: in an overlap both curves lie within the fit's error,
#: and the nearest alone interleaves the two charts' points (spiral seeds 0 and 1: 9 and 7 arcs
#: in one chart; with TIE 1, 2 and 2, the figure-8 keeping lengths on the same 19 of 20 seeds)
TIE = 1.0
REACH, SAMPLES = 4.0, 33  #: the kernel is sampled at SAMPLES points within REACH widths


def interp(q: torch.Tensor, xk: torch.Tensor, yk: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of each row: q (G, B) at knots xk (G, T) (increasing)
    with values yk (G, T) or (G, T, ...) (points: a polyline); linear beyond the ends (the end
    segments extended)."""
    T, rest = xk.shape[1], yk.shape[2:]
    i = torch.searchsorted(xk.contiguous(), q.contiguous()).clamp(1, T - 1)
    x0, x1 = xk.gather(1, i - 1), xk.gather(1, i)
    f = (q - x0) / (x1 - x0).clamp_min(torch.finfo(xk.dtype).tiny)

    def at(j: torch.Tensor) -> torch.Tensor:
        return yk.gather(1, j.view(*j.shape, *[1] * len(rest)).expand(*j.shape, *rest))

    y0 = at(i - 1)
    return y0 + f.view(*f.shape, *[1] * len(rest)) * (at(i) - y0)


@torch.no_grad()
def tables(model, x: torch.Tensor, chart: torch.Tensor,
           knots: int = KNOTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chart's table from its points: x (M, n, d) and their charts (M, n) ->
    (codes, arc lengths), each (M, E, knots).

    A chart's codes span its points' encoder codes (all points' codes for a chart with fewer
    than two points); beyond them the chart is straight (:func:`extended`); arc length is the
    summed chord of the decoder traced at the knots, in data units, from 0 at the first knot."""
    if model.cfg.latent_dim != 1:
        raise ValueError(f"arc-length charts need latent_dim 1 (a curve), "
                         f"got {model.cfg.latent_dim}")
    u = (x - model.shift) / model.scale  # (M, n, d)
    z = model.encoder(u[model.expert_model])[..., 0]  # (G, n)
    own = chart[model.expert_model] == model.expert_slot[:, None]  # (G, n)
    few = own.sum(1) < 2
    own = own | few[:, None]
    lo = torch.where(own, z, float("inf")).amin(1)
    hi = torch.where(own, z, -float("inf")).amax(1)
    span = (hi - lo).clamp_min(1e-6)
    steps = torch.linspace(0.0, 1.0, knots, dtype=z.dtype, device=z.device)
    code = lo[:, None] + span[:, None] * steps  # (G, T)
    y = model.decoder(code[..., None]) * model.scale[model.expert_model]  # (G, T, d)
    chord = (y[:, 1:] - y[:, :-1]).norm(dim=-1)  # (G, T - 1)
    s = torch.cat([chord.new_zeros(len(chord), 1), chord.cumsum(1)], 1)
    # strictly increasing, so the table inverts where the decoder stands still
    s = s + 1e-9 * s[:, -1:].clamp_min(1e-12) * steps
    M, E = model.expert_valid.shape
    out_code = code.new_zeros(M, E, knots)
    out_s = code.new_zeros(M, E, knots)
    out_code[model.expert_model, model.expert_slot] = code
    out_s[model.expert_model, model.expert_slot] = s
    return out_code, out_s


@torch.no_grad()
def project(model, x: torch.Tensor, steps: int = STEPS, prefer: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every chart's nearest point to each point of x (M, B, d) on its traced curve.

    Returns ``(chart, x_hat, s, dist2)``: the nearest active chart (M, B) (or ``prefer``'s, the
    router's, where that passes within :data:`TIE` knots of the nearest), its decoding of the
    point's code (M, B, d), every chart's arc-length code (G, B, 1) and squared distance (G, B) in
    data units. Gauss-Newton from each encoder's code, kept within the chart's traced range,
    then the nearest point on each straight end (:func:`extended`) where that is nearer; the
    best code any step reached gives the distance, and the arc length at it, smoothed
    (:func:`smooth`) where that decodes near the point (:data:`KEEP`), the code; ``x_hat``
    decodes that code."""
    g_m, g_e = model.expert_model, model.expert_slot
    code, length = model.arc_code[g_m, g_e], model.arc_length[g_m, g_e]  # (G, T)
    lo, hi = code[:, :1], code[:, -1:]  # (G, 1)
    u = ((x - model.shift) / model.scale)[g_m]  # (G, B, d)
    z = torch.minimum(torch.maximum(model.encoder(u)[..., 0], lo), hi)  # (G, B)
    ones = torch.ones_like(z)[..., None]
    best_z, best_d, best_y = z, torch.full_like(z, float("inf")), torch.zeros_like(u)
    for i in range(steps + 1):
        if i < steps:
            y, jv = stacked_jvp(model.decoder, z[..., None], ones)  # (G, B, d) each
        else:  # the last step's code needs only its distance
            y = model.decoder(z[..., None])
        r = y - u
        d2 = (r**2).sum(-1)
        better = d2 < best_d
        best_z, best_d = torch.where(better, z, best_z), torch.where(better, d2, best_d)
        best_y = torch.where(better[..., None], y, best_y)
        if i == steps:
            break
        step = (jv * r).sum(-1) / (jv**2).sum(-1).clamp_min(1e-30)
        z = torch.minimum(torch.maximum(z - step, lo), hi)
    # the straight ends: the nearest point of each, where nearer than the traced curve's
    _, _, y_lo, v_lo, y_hi, v_hi = ends(model)
    room = EXTEND * (hi - lo)  # (G, 1): each straight end's length in codes
    for y0, v, end, sign in ((y_hi, v_hi, hi, 1.0), (y_lo, v_lo, lo, -1.0)):
        a = ((u - y0[:, None]) * v[:, None]).sum(-1) / (v**2).sum(-1).clamp_min(1e-30)[:, None]
        a = torch.minimum((sign * a).clamp_min(0.0), room)  # (G, B) beyond this end only
        yr = y0[:, None] + (sign * a)[..., None] * v[:, None]
        d2 = ((yr - u) ** 2).sum(-1)
        better = (d2 < best_d) & (a > 0)
        best_z = torch.where(better, end + sign * a, best_z)
        best_d = torch.where(better, d2, best_d)
        best_y = torch.where(better[..., None], yr, best_y)
    scale = model.scale[g_m]  # (G, 1, 1)
    dist2 = best_d * scale[..., 0] ** 2  # (G, B) in data units
    near = interp(best_z, code, length)  # (G, B): the nearest point's arc length
    s = smooth(model, x, near, dist2)[..., None]  # (G, B, 1)
    y = extended(model, raw_codes(model, s))  # (G, B, d)
    # the smoothed code only where it decodes near the point (not across a cusp's tip)
    knot = knot_length(length)  # (G, 1) in data units
    knot2 = knot**2 / scale[..., 0] ** 2  # (G, 1) in the network's units
    keep = ((y - u) ** 2).sum(-1) <= KEEP * best_d + SLACK * knot2  # (G, B)
    s = torch.where(keep[..., None], s, near[..., None])
    y = torch.where(keep[..., None], y, best_y)
    d = model.padded(dist2).masked_fill(~model.active[..., None], float("inf"))  # (M, E, B)
    chart = d.argmin(1)  # (M, B)
    if prefer is not None and TIE > 0:  # within TIE knots of the nearest: the preferred chart
        own = d.gather(1, prefer[:, None]).squeeze(1)  # (M, B)
        reach = model.padded(TIE * knot)[..., 0].gather(1, prefer)  # (M, B)
        tie = own <= d.gather(1, chart[:, None]).squeeze(1) + reach**2
        chart = torch.where(tie, prefer, chart)
    y = model.padded(y * scale + model.shift[g_m])  # (M, E, B, d)
    x_hat = y.gather(1, chart[:, None, :, None].expand(-1, 1, -1, y.shape[-1]))[:, 0]
    return chart, x_hat, s, dist2


@torch.no_grad()
def smooth(model, x: torch.Tensor, s: torch.Tensor, dist2: torch.Tensor) -> torch.Tensor:
    """Arc-length codes s (G, B) of the points x (M, B, d), smoothed along each chart's traced
    curve; dist2 (G, B) their squared distances from it, in data units.

    The code becomes the mean arc length of the traced polyline near s, weighted by
    ``exp(-(|y(s') - x|^2 - min) / 2 h^2)``, with ``h^2 = dist2 + (SMOOTH knots)^2``: a point on
    the curve keeps its nearest point's code (the kernel is symmetric where the curve is
    straight at its scale), and a point beside a kink of the decoder's curve, where the nearest
    point jumps from one side of the kink to the other, is coded by a mean that moves
    smoothly. Kept within the traced range and its straight ends."""
    g_m, g_e = model.expert_model, model.expert_slot
    code, length = model.arc_code[g_m, g_e], model.arc_length[g_m, g_e]  # (G, T)
    y = model.decoder(code[..., None]) * model.scale[g_m] + model.shift[g_m]  # (G, T, d)
    first, last = reach(model)  # (G, 1) each
    h = (dist2 + (SMOOTH * knot_length(length)) ** 2).sqrt()  # (G, B)
    offsets = torch.linspace(-REACH, REACH, SAMPLES, dtype=s.dtype, device=s.device)
    xg = x[g_m]  # (G, B, d)
    (G, B), d = s.shape, y.shape[-1]
    out = torch.empty_like(s)
    chunk = max(1, 2**22 // (G * SAMPLES * d))  # points per pass, bounding the (G, b, K, d) samples
    for a in range(0, B, chunk):
        sk = s[:, a:a + chunk, None] + h[:, a:a + chunk, None] * offsets  # (G, b, K)
        yk = interp(sk.flatten(1), length, y).view(*sk.shape, d)  # along the polyline
        d2 = ((yk - xg[:, a:a + chunk, None]) ** 2).sum(-1)  # (G, b, K)
        w = torch.exp(-(d2 - d2.amin(-1, keepdim=True)) / (2 * h[:, a:a + chunk, None] ** 2))
        out[:, a:a + chunk] = (w * sk).sum(-1) / w.sum(-1)
    return torch.minimum(torch.maximum(out, first), last)


def reach(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chart's codes with its straight ends, in arc length: ``(first, last)``, each (G, 1):
    ``-EXTEND`` and ``1 + EXTEND`` of its code range, the table's 0 and length inside."""
    g_m, g_e = model.expert_model, model.expert_slot
    code, length = model.arc_code[g_m, g_e], model.arc_length[g_m, g_e]  # (G, T)
    lo, hi = code[:, :1], code[:, -1:]
    out = EXTEND * (hi - lo)
    return interp(lo - out, code, length), interp(hi + out, code, length)


def ends(model) -> tuple[torch.Tensor, ...]:
    """Each chart's ends: codes ``lo``, ``hi`` (G, 1), and the decoder's points (G, d) and
    velocities (G, d) there, the velocity that of the end segment of its table (network
    units): ``(lo, hi, y_lo, v_lo, y_hi, v_hi)``."""
    g_m, g_e = model.expert_model, model.expert_slot
    code = model.arc_code[g_m, g_e]  # (G, T)
    c = torch.stack([code[:, 0], code[:, 1], code[:, -2], code[:, -1]], 1)  # (G, 4)
    y = model.decoder(c[..., None])  # (G, 4, d)
    v_lo = (y[:, 1] - y[:, 0]) / (c[:, 1] - c[:, 0]).clamp_min(1e-30)[:, None]
    v_hi = (y[:, 3] - y[:, 2]) / (c[:, 3] - c[:, 2]).clamp_min(1e-30)[:, None]
    return c[:, :1], c[:, 3:], y[:, 0], v_lo, y[:, 3], v_hi


def extended(model, z: torch.Tensor) -> torch.Tensor:
    """The decoders at the network's codes z (G, B, 1), in network units (G, B, d): each
    straight beyond its table's ends, along its end segment (the arc length that
    :func:`interp` extends the table by)."""
    lo, hi, y_lo, v_lo, y_hi, v_hi = ends(model)
    zc = torch.minimum(torch.maximum(z[..., 0], lo), hi)  # (G, B)
    over = (z[..., 0] - zc)[..., None]  # (G, B, 1): beyond an end (signed)
    v = torch.where(over > 0, v_hi[:, None], v_lo[:, None])  # (G, B, d)
    return model.decoder(zc[..., None]) + over * v


def knot_length(length: torch.Tensor) -> torch.Tensor:
    """Each chart's arc length between neighbouring knots, from its table (G, T): (G, 1)."""
    return length[:, -1:] / (length.shape[1] - 1)


def raw_codes(model, s: torch.Tensor) -> torch.Tensor:
    """Arc-length codes s (G, B, 1) of every chart -> the network's codes (G, B, 1)."""
    g_m, g_e = model.expert_model, model.expert_slot
    code, length = model.arc_code[g_m, g_e], model.arc_length[g_m, g_e]
    return interp(s[..., 0], length, code)[..., None]


@torch.no_grad()
def network_codes(model, codes):
    """Atlas codes (n, 2) (chart, arc length) of a population of one -> (chart, the network's
    code), as numpy: what the decoders themselves take (:mod:`moeae.sampling`)."""
    import numpy as np

    codes = np.asarray(codes, dtype=np.float64)
    s = torch.as_tensor(codes[:, 1:], dtype=model.shift.dtype, device=model.shift.device)
    u = raw_codes(model, s[None].expand(len(model.expert_model), -1, -1))  # (E, n, 1)
    rows = np.arange(len(codes))
    return np.c_[codes[:, 0], u.cpu().numpy()[codes[:, 0].astype(int), rows]]
