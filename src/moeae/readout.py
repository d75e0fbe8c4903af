"""Solved output layers: each decoder's last layer fitted in closed form to its chart's points.

A decoder ends in a linear layer. Given the last hidden layer's features ``h`` of the points a
chart holds, the output weights that reconstruct them best are a least-squares problem, which
Adam approaches slowly: a decoder regressing a quarter of a picture's turn (576 features) on
its angle reached FVU 5.3e-4 in the recipe's 1600 steps, and 9.4e-6 with the same features and
solved output weights (docs/recipes.md, session 13).

The solve is a ridge regression towards the trained weights ``W0``::

    W = argmin |A W - U|^2 + w |A' (W - W0)|^2 + lam |W - W0|^2

with ``A = [h, 1]`` and ``U`` the chart's points (in network units), and ``A'`` the features of
the model's other points, which ask with a small weight ``w`` (:data:`OFF_CHART`) that the
decoder keep reconstructing them as it was trained to. ``lam`` is chosen per chart by
leave-one-out error over its points, which one SVD gives for every ``lam``
(:func:`leave_one_out`). A chart takes the solve only where it explains enough of the error
(:data:`ACCEPT`): on noisy points the error left is mostly noise, and a closer fit to
noisy points moves the chart off the clean manifold (figure-8 with noise 0.05: leave-one-out
error 0.99 of the trained layer's; error on clean points 2.5e-4 -> 3.8e-4 if taken).

A solve leaves residuals that its chart's features cannot explain, which neighbours along the
chart no longer share: on a coil of 300 points in 10 charts (too few points for its turns 0.3
apart) they agreed by 0.69 as trained and by -0.10 once solved, which :mod:`moeae.tears` would
read as noise. So :func:`refit_outputs` records the trained layers' agreement first
(``MoEAE.trained_agreement``), and the underfit check reads that.

Every rank of a ``torchrun`` job holds the same trained weights and solves the same problem on
the CPU in float64, so the solved weights agree.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["refit_outputs", "solve", "leave_one_out", "ACCEPT", "LAMBDAS", "OFF_CHART"]

#: A chart takes the solved weights only if their leave-one-out error is at most this share of
#: the trained weights' error on the same points. Measured per chart: clean curves and surfaces
#: 0.0-0.8 (most below 0.6), noisy curves (noise 0.01-0.05 per coordinate) 0.95-1.0.
ACCEPT = 0.8
#: Ridge strengths tried, relative to the mean squared singular value of ``A``.
LAMBDAS = 10.0 ** np.arange(-10, 3)
#: Weight of each point of another chart, asking the decoder to reconstruct it as trained:
#: a solve on the chart's points alone left decoders far off elsewhere, where the soft
#: reconstruction still mixes them in (trefoil, 4 charts: soft FVU 1.1e-4 -> 0.12; with this
#: weight 1.1e-4, and hard FVU 7.7e-6 -> 1.9e-6 against 2.9e-6 without).
OFF_CHART = 1e-3
MIN_POINTS = 8  # a chart with fewer points keeps its weights


class _Ridge(NamedTuple):
    """One SVD of the stacked rows ``[A; B] = U diag(S) Vh`` and what every strength shares."""

    U: torch.Tensor  # (n + m, p)
    S: torch.Tensor  # (p,)
    Vh: torch.Tensor  # (p, p)
    UR: torch.Tensor  # (p, d): U^T [R; 0]
    n: int  # rows of A, the ones left out in turn


def _factor(A: torch.Tensor, R: torch.Tensor, B: torch.Tensor | None) -> _Ridge:
    As, Rs = (A, R) if B is None else (
        torch.cat([A, B]), torch.cat([R, R.new_zeros(len(B), R.shape[1])]))
    U, S, Vh = torch.linalg.svd(As, full_matrices=False)
    return _Ridge(U, S, Vh, U.T @ Rs, len(A))


def _leave_one_out(f: _Ridge, R: torch.Tensor, lams) -> torch.Tensor:
    Un = f.U[:f.n]
    out = []
    for lam in lams:
        shrink = f.S**2 / (f.S**2 + float(lam))  # of each singular direction
        lev = (Un**2) @ shrink  # (n,)
        res = R - Un @ (shrink[:, None] * f.UR)
        out.append(((res / (1 - lev).clamp_min(1e-12)[:, None]) ** 2).sum(1).mean())
    return torch.stack(out)


def leave_one_out(A: torch.Tensor, R: torch.Tensor, lams,
                  B: torch.Tensor | None = None) -> torch.Tensor:
    """The mean squared leave-one-out error over the rows of A (n, p) of ridge regressions of
    R (n, d) on A, one per strength in ``lams`` (absolute), from one SVD: a point's left-out
    residual is its residual over ``1 - h_ii``, ``h_ii`` its leverage. ``B`` (m, p): further
    rows whose residual is 0 (they ask for no change), fitted along but never left out."""
    return _leave_one_out(_factor(A, R, B), R, lams)


def solve(A: torch.Tensor, R: torch.Tensor,
          B: torch.Tensor | None = None) -> tuple[torch.Tensor | None, float, float]:
    """The ridge step ``dW`` (p, d) that predicts the residuals R (n, d) from the features A
    (n, p) best by leave-one-out error (``B``: rows held at no change, see
    :func:`leave_one_out`), with its strength (relative to the mean squared singular value)
    and its error as a share of R's own (``dW = 0``); ``dW`` is None (keep the trained
    weights) unless that share is at most :data:`ACCEPT`."""
    base = float((R**2).sum(1).mean())
    if base == 0.0:
        return None, float("inf"), 1.0
    f = _factor(A, R, B)
    unit = float((f.S**2).mean())
    loo = _leave_one_out(f, R, LAMBDAS * unit)
    i = int(loo.argmin())
    ratio = float(loo[i]) / base
    if ratio > ACCEPT:
        return None, float(LAMBDAS[i]), ratio
    lam = float(LAMBDAS[i]) * unit
    return f.Vh.T @ ((f.S / (f.S**2 + lam))[:, None] * f.UR), float(LAMBDAS[i]), ratio


@torch.no_grad()
def refit_outputs(model, x: torch.Tensor, chunk: int = 4096) -> list[dict]:
    """Solve each expert's output layer on the points x (M, n, d) (the training data) of its
    chart (:meth:`moeae.model.MoEAE.charts`). Returns, per expert of the population, what was
    done: ``points``, ``lam`` (relative; inf: too few points or an inactive chart), ``ratio``
    (leave-one-out error over the trained layer's) and ``refit`` (bool). Sets each model's
    ``trained_agreement``: :func:`moeae.tears.residual_agreement` of its points' residuals with
    the output layers as trained, each point in its chart."""
    from .tears import residual_agreement

    was = model.training
    model.eval()
    dec = model.decoder
    *hidden, last = dec.linears()
    charts, feats, targets, codes = [], [], [], []
    for i in range(0, x.shape[1], chunk):
        xb = x[:, i:i + chunk]
        charts.append(model.charts(model.forward(xb, mix=False), xb))  # (M, b)
        u = (xb - model.shift) / model.scale  # (M, b, d)
        h = model.encoder(u[model.expert_model])  # (G, b, k)
        codes.append(h.double().cpu())
        for layer in hidden:
            h = dec.hidden(layer(h))
        feats.append(h.double().cpu())  # (G, b, H)
        targets.append(u.double().cpu())
    chart = torch.cat(charts, 1).cpu()  # (M, n)
    H = torch.cat(feats, 1)  # (G, n, H)
    Y = torch.cat(targets, 1)  # (M, n, d)
    W0 = torch.cat([last.weight, last.bias], 1).double().cpu()  # (G, H + 1, d)
    Z = torch.cat(codes, 1)  # (G, n, k)
    R = torch.zeros_like(Y)  # (M, n, d): each point's residual in its chart, as trained
    z = torch.zeros(*Y.shape[:2], Z.shape[-1], dtype=torch.float64)  # (M, n, k): its code
    report = []
    for g in range(H.shape[0]):
        m, e = int(model.expert_model[g]), int(model.expert_slot[g])
        mine = chart[m] == e
        A = torch.cat([H[g], torch.ones(H.shape[1], 1, dtype=torch.float64)], 1)  # (n, p)
        R[m, mine] = Y[m, mine] - A[mine] @ W0[g]  # as trained (W0 is a copy)
        z[m, mine] = Z[g, mine]
        n = int(mine.sum())
        info = {"points": n, "lam": float("inf"), "ratio": 1.0, "refit": False}
        report.append(info)
        if n < MIN_POINTS or not bool(model.active[m, e]):
            continue
        B = math.sqrt(OFF_CHART) * A[~mine]  # the model's other points: stay as trained
        dW, info["lam"], info["ratio"] = solve(A[mine], R[m, mine], B)
        if dW is None:
            continue
        W = (W0[g] + dW).to(last.weight)
        last.weight[g].copy_(W[:-1])
        last.bias[g, 0].copy_(W[-1])
        info["refit"] = True
    for m in range(len(model.counts)):
        model.trained_agreement[m] = residual_agreement(
            np.c_[chart[m].numpy(), z[m].numpy()], R[m].numpy())
    model.train(was)
    return report
