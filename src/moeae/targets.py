"""Per-epoch routing targets: which chart each training point belongs to, and how much each
expert learns it.

Once per epoch (``relabel_neighbors`` > 0), every point's responsibilities
``softmax(-err / tau)`` over the experts are averaged over its nearest neighbours in the data;
the average keeps charts contiguous where two experts fit equally well, which per-batch targets
turned into many one-point fragments. With ``relabel_hard`` the winner takes the point. With
``expert_overlap`` each expert also learns a margin around its chart.
"""

from __future__ import annotations

import torch

from .config import TrainConfig
from .data_parallel import DataParallel
from .model import MoEAE

__all__ = ["routing_targets", "OVERLAP_GATE"]

# Points per forward pass: all experts of a population stay cache-sized (as training.EVAL_CHUNK)
CHUNK = 128
# An expert learns a neighbour of its chart (expert_overlap) only where its error is within this
# factor of the mean error of every point's own expert.
OVERLAP_GATE = 100.0


@torch.no_grad()
def expert_errors(m: MoEAE, X: torch.Tensor, parallel: DataParallel | None = None
                  ) -> torch.Tensor:
    """Each expert's normalised squared error on each point of X (M, n, d): (M, n, E), inf
    for experts a model does not have or has switched off. Under torchrun each rank computes
    its part of the points and the parts are summed."""
    was = m.training
    m.eval()
    valid = m.active[:, None, :]  # (M, 1, E)
    M, n = X.shape[:2]
    err = X.new_zeros((M, n, valid.shape[-1]))
    part = slice(0, n) if parallel is None else parallel.part(n)
    # few experts: larger chunks (figure-8, 2 charts: 22 ms per relabelling in chunks of 128
    # points, 11 ms in one of 1000)
    chunk = max(CHUNK, 2048 // len(m.expert_model))
    for i in range(part.start, part.stop, chunk):
        xb = X[:, i:min(i + chunk, part.stop)]
        y = m.padded(m.expert_outputs(xb))  # (M, E, b, d)
        err[:, i:i + xb.shape[1]] = (((y - xb[:, None]) / m.scale[:, None]) ** 2
                                     ).mean(-1).transpose(1, 2)
    m.train(was)
    if parallel is not None:
        parallel.sum_(err)  # each point's errors from the rank that computed them
    return err.masked_fill(~valid, float("inf"))


@torch.no_grad()
def routing_targets(m: MoEAE, X: torch.Tensor, knn: torch.Tensor, cfg: TrainConfig,
                    tau: float, parallel: DataParallel | None = None,
                    clean: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Targets ``(labels, expert_weights)`` for the points X (M, n, d) with neighbour lists
    ``knn`` (M, n, k), nearest first, itself included.

    ``labels`` (M, n, E): responsibilities at temperature ``tau`` (relative to the mean
    error), averaged over each point's ``cfg.relabel_neighbors`` nearest, one-hot with
    ``cfg.relabel_hard``. ``expert_weights`` (M, n, E) or None: with ``cfg.expert_overlap``,
    each expert also learns a point in proportion to its share of the point's
    ``expert_overlap`` nearest, so a point the router sends just across a boundary still finds
    an expert that knows it; only where that expert's error is within :data:`OVERLAP_GATE`
    times the mean error of the points' own experts (a neighbour in space from another turn of
    a coil is not taken in), and only at ``clean`` points (M, n), away from self-crossings,
    where an expert would learn the other branch (figure-8, seed 0: 95% of the error in 20
    points at the waist). Near those instead (a point of theirs among the ``expert_overlap``
    nearest), with ``cfg.learn_routed``, each expert learns the points its router sends it:
    the router cannot tell two branches apart where they cross, and a point it sends to the
    other branch's chart is then still reconstructed (figure-8: islands of the other chart
    reached 0.06 from the crossing, where its error was up to 0.25).
    """
    err = expert_errors(m, X, parallel)
    valid = m.active[:, None, :]
    M, n, E = err.shape
    ref = torch.where(valid, err, 0.0).sum((1, 2)) / (valid.sum((1, 2)) * n)
    r = torch.softmax(-err / (tau * ref.clamp_min(1e-12)[:, None, None]), dim=-1)

    def averaged(k: int) -> torch.Tensor:  # (M, n, E) over each point's k nearest
        idx = knn[..., :k].reshape(M, n * k, 1).expand(-1, -1, E)
        return r.gather(1, idx).view(M, n, k, E).mean(2)

    labels = averaged(min(cfg.relabel_neighbors, knn.shape[-1]))
    if cfg.relabel_hard:  # winner takes the point: overlaps shrink, ties resolve
        labels = torch.nn.functional.one_hot(labels.argmax(-1), E).to(r.dtype)
    if cfg.expert_overlap <= 0:
        return labels, None
    own = err.min(-1).values.mean(1)[:, None, None]  # (M, 1, 1)
    near = err <= OVERLAP_GATE * own
    if clean is not None:
        near = near & (clean[..., None] > 0)
    weights = torch.maximum(labels, averaged(knn.shape[-1]) * near)
    if cfg.learn_routed and clean is not None:  # near self-crossings: where the router sends
        k = knn.shape[-1]  # near: a crossing's point among the expert_overlap nearest
        crossing = (clean == 0).to(r.dtype).gather(1, knn.reshape(M, n * k))
        near_crossing = crossing.view(M, n, k).amax(-1) > 0  # (M, n)
        if not bool(near_crossing.any()):  # a curve without crossings: nothing to add
            return labels, weights
        routed = torch.cat([m.route(X[:, i:i + CHUNK * 8]) for i in range(0, n, CHUNK * 8)], 1)
        onehot = torch.nn.functional.one_hot(routed, E).to(r.dtype)
        weights = torch.maximum(weights, onehot * near_crossing[..., None])
    return labels, weights
