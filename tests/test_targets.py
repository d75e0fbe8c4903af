"""Per-epoch routing targets (moeae.targets) against independent computations."""

import torch

from moeae.config import ModelConfig, TrainConfig
from moeae.model import MoEAE
from moeae.targets import OVERLAP_GATE, expert_errors, routing_targets


def small_model(E: int = 3) -> MoEAE:
    torch.manual_seed(0)
    m = MoEAE(ModelConfig(n_features=2, latent_dim=1, n_experts=E, width=16, depth=2))
    m.reset_parameters([0])
    with torch.no_grad():
        m.shift.fill_(0.1)
        m.scale.fill_(2.0)
    return m


def points(n: int = 40) -> torch.Tensor:
    t = torch.linspace(0, 3, n)
    return torch.stack([torch.cos(t), torch.sin(t)], -1)[None]  # (1, n, 2)


def test_expert_errors_are_each_experts_own_squared_error():
    m, X = small_model(), points()
    err = expert_errors(m, X)
    with torch.no_grad():
        y = m(X).expert_outputs  # (E, n, d): every expert on every point
    ref = (((y - X) / 2.0) ** 2).mean(-1).T  # normalised by the input scale
    torch.testing.assert_close(err[0], ref)
    assert torch.equal(m.expert_outputs(X), y)  # the router-free pass the targets use
    m.active[0, 1] = False  # a switched-off expert never wins
    assert torch.isinf(expert_errors(m, X)[0, :, 1]).all()


def test_targets_labels_margin_gate_and_routed_points():
    m, X = small_model(), points()
    n, E = X.shape[1], 3
    knn = torch.arange(n)[None, :, None]  # each point its own only neighbour
    err = expert_errors(m, X)[0]
    cfg = TrainConfig(relabel_neighbors=1, relabel_hard=True)
    labels, weights = routing_targets(m, X, knn, cfg, tau=0.1)
    assert weights is None
    assert torch.equal(labels[0].argmax(-1), err.argmin(-1))  # the best expert takes it
    assert torch.equal(labels.sum(-1), torch.ones(1, n))

    # a margin over the 3 nearest along the line: the shares of the neighbours' labels,
    # where the expert's error is within the gate
    knn3 = torch.stack([torch.arange(n), (torch.arange(n) + 1).clamp(max=n - 1),
                        (torch.arange(n) - 1).clamp(min=0)], -1)[None]
    cfg = TrainConfig(relabel_neighbors=1, relabel_hard=True, expert_overlap=3)
    labels, weights = routing_targets(m, X, knn3, cfg, tau=1e-6)
    share = labels[0][knn3[0]].mean(1)  # (n, E): hard labels of each point's 3 nearest
    gate = err <= OVERLAP_GATE * err.min(-1).values.mean()
    torch.testing.assert_close(weights[0], torch.maximum(labels[0], share * gate))
    assert (weights > labels).any()  # the margin reaches across some boundary
    _, none = routing_targets(m, X, knn3, cfg, tau=1e-6, clean=torch.zeros(1, n))
    assert torch.equal(none, labels)  # no margin at points near a self-crossing

    # learn_routed: near a self-crossing (a point that is not clean among the 3 nearest) each
    # expert also learns where the router sends each point now; elsewhere nothing changes
    cfg = TrainConfig(relabel_neighbors=1, relabel_hard=True, expert_overlap=3,
                      learn_routed=True)
    clean = torch.ones(1, n)
    clean[0, 20:] = 0  # points 19.. have such a neighbour
    _, plain = routing_targets(m, X, knn3, TrainConfig(relabel_neighbors=1, relabel_hard=True,
                                                       expert_overlap=3), tau=1e-6, clean=clean)
    _, routed = routing_targets(m, X, knn3, cfg, tau=1e-6, clean=clean)
    chart = m.route(X)[0]
    with torch.no_grad():
        assert torch.equal(chart, m(X).probs[0].argmax(-1))
    onehot = torch.nn.functional.one_hot(chart, E).to(routed.dtype)
    torch.testing.assert_close(routed[0, 19:], torch.maximum(plain[0, 19:], onehot[19:]))
    assert torch.equal(routed[0, :19], plain[0, :19])
    assert (routed > plain).any()  # the untrained router disagrees with the targets there
    _, unknown = routing_targets(m, X, knn3, cfg, tau=1e-6)  # crossings unknown: as before
    assert torch.equal(unknown, weights)


def test_training_with_the_best_recipe_sets_the_fallback_and_the_seed_recipe_not():
    import numpy as np

    from moeae.config import recipe
    from moeae.training import Trainer

    X = points(200)
    for name, expect_on in (("best", True), ("seed", False)):
        mc, tc = recipe(name, n_features=2, latent_dim=1, n_experts=2, epochs=2)
        trainer = Trainer(MoEAE(mc, [2]), tc, [0])
        trainer.initialize(X)
        trainer.fit(X, 2)
        m = trainer.model.eval()
        if not expect_on:
            assert float(m.fallback[0]) == 0.0
            continue
        with torch.no_grad():
            out = m(X)
        y = m.padded(out.expert_outputs)[0].numpy()  # (E, n, d)
        chart = out.probs[0].argmax(-1).numpy()  # the router's own chart
        own = ((y[chart, np.arange(200)] - X[0].numpy()) ** 2).sum(-1)
        np.testing.assert_allclose(float(m.fallback[0]),
                                   tc.fallback_gate * np.quantile(own, 0.99), rtol=1e-5)
