"""The stacked model against an independent per-expert computation with the same weights."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moeae.config import ModelConfig, TrainConfig, recipe
from moeae.layers import DropoutMasks
from moeae.model import MoEAE
from moeae.training import Trainer


def mlp_reference(layers, x, out_act):
    """One MLP, layer by layer, with plain F.linear on one group's weights."""
    for i, (w, b) in enumerate(layers):
        x = F.linear(x, w.T, b[0])
        if i < len(layers) - 1:
            x = torch.relu(x)
    return torch.tanh(x) if out_act == "tanh" else x


def weights(mlp, g):
    return [(lay.weight[g].detach(), lay.bias[g].detach()) for lay in mlp.layers]


def reference_forward(model, x):
    """Loop over models and experts: the seed's own formulation."""
    outs = []
    g = 0
    for m, E in enumerate(model.counts):
        logits = mlp_reference(weights(model.router, m), x[m], "linear")[:, :E]
        p = torch.softmax(logits, -1)
        x_hat = torch.zeros_like(x[m])
        for e in range(E):
            z = mlp_reference(weights(model.encoder, g), x[m], "tanh")
            y = mlp_reference(weights(model.decoder, g), z, "linear")
            x_hat += p[:, e:e + 1] * y
            g += 1
        outs.append(x_hat)
    return torch.stack(outs)


@pytest.mark.parametrize("counts", [[1], [4], [1, 2, 4, 8]])
def test_stacked_experts_equal_per_expert_loop(counts):
    cfg = ModelConfig(n_features=3, latent_dim=2, width=16, depth=3)
    model = MoEAE(cfg, counts)
    model.reset_parameters(list(range(len(counts))))
    x = torch.randn(len(counts), 50, 3)
    out = model(x)
    np.testing.assert_allclose(out.x_hat.detach(), reference_forward(model, x).detach(),
                               atol=1e-6)
    assert out.expert_outputs.shape == (sum(counts), 50, 3)
    assert out.latents.shape == (sum(counts), 50, 2)
    assert out.probs.shape == (len(counts), 50, max(counts))
    # padded experts get zero probability
    for m, E in enumerate(counts):
        assert torch.all(out.probs[m, :, E:] == 0)
        np.testing.assert_allclose(out.probs[m].sum(-1).detach(), 1.0, atol=1e-6)


def test_population_member_initialised_as_alone():
    cfg = ModelConfig(width=8, depth=2)
    pop = MoEAE(cfg, [2, 8, 3])
    pop.reset_parameters([5, 6, 7])
    alone = MoEAE(cfg, [8])
    alone.reset_parameters([6])
    x = torch.randn(1, 20, 2)
    xs = torch.cat([torch.randn(1, 20, 2), x, torch.randn(1, 20, 2)])
    np.testing.assert_allclose(pop(xs).x_hat[1].detach(), alone(x).x_hat[0].detach(),
                               atol=1e-6)


def test_encode_decode_is_the_hard_reconstruction():
    cfg = ModelConfig(width=16, depth=2, n_experts=3)
    model = MoEAE(cfg).eval()
    model.reset_parameters([0])
    x = torch.randn(1, 40, 2)
    chart, z = model.encode(x)
    x_dec = model.decode(chart, z)
    out = model(x)
    chart2, x_hard = model.hard(out, x)
    assert torch.equal(chart, chart2)
    np.testing.assert_allclose(x_dec, x_hard, atol=1e-6)
    # and it is the chosen expert's own output
    y = model.padded(out.expert_outputs)
    for i in range(40):
        np.testing.assert_allclose(x_hard[0, i], y[0, chart[0, i], i].detach(), atol=1e-6)


def test_dropout_rate_scale_and_layout():
    from moeae.layers import DropoutSites

    drop = DropoutMasks(0.1, [torch.Generator().manual_seed(0)])
    sites = [DropoutSites([1], 2, 100, [3], 5), DropoutSites([4], 3, 50, None, 7)]
    (h1, o1), (h2, o2) = drop.draw(sites, 500, "cpu")
    assert h1.shape == (1, 2, 500, 100) and o1.shape == (1, 500, 5)
    assert h2.shape == (4, 3, 500, 50) and o2 is None
    every = torch.cat([h1.flatten(), o1[..., :3].flatten(), h2.flatten()])
    np.testing.assert_allclose(every.unique(), [0.0, 1 / 0.9], rtol=1e-4)
    kept = (every > 0).double().mean().item()  # 2 * 500 * 103 + 4 * 3 * 500 * 50 draws
    assert abs(kept - 0.9) < 0.003
    assert torch.all(o1[..., 3:] > 0)  # padding columns are always kept


def test_dropout_masks_of_a_model_do_not_depend_on_the_population():
    from moeae.layers import DropoutSites

    def draw(counts, seeds):
        drop = DropoutMasks(0.3, [torch.Generator().manual_seed(s) for s in seeds])
        sites = [DropoutSites([1] * len(counts), 2, 8, counts, max(counts)),
                 DropoutSites(counts, 2, 8, [1] * len(counts), 1)]
        return drop.draw(sites, 6, "cpu")

    (rh, ro), (eh, eo) = draw([2, 5, 1], [3, 4, 5])
    (rh1, ro1), (eh1, eo1) = draw([5], [4])
    assert torch.equal(rh[1], rh1[0]) and torch.equal(ro[1], ro1[0])
    assert torch.equal(eh[2:7], eh1) and torch.equal(eo[2:7], eo1)


def _train(counts, seeds, datas, epochs=2):
    mc, tc = recipe("seed", epochs=epochs, width=16, depth=2)
    model = MoEAE(mc, counts)
    tr = Trainer(model, tc, seeds)
    X = torch.tensor(np.stack(datas), dtype=torch.float32)
    tr.initialize(X)
    tr.fit(X, epochs)
    return tr


def test_population_training_equals_training_alone():
    rng = np.random.default_rng(0)
    datas = [rng.normal(size=(100, 2)) for _ in range(3)]
    pop = _train([2, 4, 1], [10, 11, 12], datas)
    for m, (E, seed) in enumerate([(2, 10), (4, 11), (1, 12)]):
        alone = _train([E], [seed], [datas[m]])
        x = torch.tensor(datas[m][None], dtype=torch.float32)
        xs = torch.tensor(np.stack(datas), dtype=torch.float32)
        pop.model.eval()
        alone.model.eval()
        with torch.no_grad():
            a = pop.model(xs).x_hat[m]
            b = alone.model(x).x_hat[0]
        np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_allclose(pop.state.history[-1][m], alone.state.history[-1][0],
                                   rtol=1e-5)


def test_config_validation_messages():
    with pytest.raises(ValueError, match=">= 1 expert"):
        MoEAE(ModelConfig(), [2, 0])
    with pytest.raises(ValueError, match="dropout must be in"):
        DropoutMasks(1.5, [])
    with pytest.raises(ValueError, match="unknown recipe 'fast'; valid recipes: seed, best"):
        recipe("fast")
    with pytest.raises(TypeError, match="unknown setting 'colour'"):
        recipe("seed", colour=1)
    assert TrainConfig().routing == "soft"


def _router_picks_expert_0(model):
    """Route every point to expert 0 and move expert 0's reconstructions 100 away."""
    with torch.no_grad():
        last = model.router.linears()[-1]
        last.weight.zero_()
        last.bias[0, 0] = torch.tensor([50.0, -50.0])
        model.decoder.linears()[-1].bias[0] += 100.0


def test_router_chart_is_checked_where_it_cannot_reconstruct():
    model = MoEAE(ModelConfig(width=16, depth=2, n_experts=2)).eval()
    model.reset_parameters([0])
    _router_picks_expert_0(model)
    x = torch.randn(1, 30, 2)
    out = model(x)
    y = model.padded(out.expert_outputs)
    assert (model.charts(out, x) == 0).all()  # fallback 0: the router's chart
    model.fallback.fill_(1.0)  # expert 0's squared error (~2e4) is above it, expert 1's not
    chart, x_hard = model.hard(out, x)
    assert (chart == 1).all()
    assert torch.equal(x_hard[0], y[0, 1])
    assert torch.equal(model.encode(x)[0], chart)
    model.fallback.fill_(1e5)  # above expert 0's error: the router's chart stands
    assert (model.charts(out, x) == 0).all()
    model.fallback.fill_(1.0)
    with torch.no_grad():  # expert 1 as bad, but not 10x better: the router's chart stands
        model.decoder.linears()[-1].bias[1] += 90.0
    assert (model.charts(model(x), x) == 0).all()
    model.active[0, 1] = False  # a switched-off expert never takes a point
    assert (model.charts(model(x), x) == 0).all()


def test_set_fallback_is_the_gate_times_the_99th_percentile():
    model = MoEAE(ModelConfig(width=16, depth=2, n_experts=3), [3, 3]).eval()
    model.reset_parameters([0, 1])
    x = torch.randn(2, 500, 2)
    model.set_fallback(x, 10.0)
    out = model(x)
    y = model.padded(out.expert_outputs).detach().numpy()  # (M, E, n, d)
    chart = out.probs.argmax(-1).numpy()  # the router's own choice
    for m in range(2):
        own = ((y[m, chart[m], np.arange(500)] - x[m].numpy()) ** 2).sum(-1)
        np.testing.assert_allclose(float(model.fallback[m]), 10 * np.quantile(own, 0.99),
                                   rtol=1e-5)
    one = model.select(1)
    assert torch.equal(one.fallback, model.fallback[1:])
    model.set_fallback(x, 0.0)
    assert (model.fallback == 0).all()


def test_state_saved_before_the_fallback_loads_with_the_router_alone():
    model = MoEAE(ModelConfig(width=16, depth=2, n_experts=2))
    model.reset_parameters([0])
    sd = model.state_dict()
    del sd["fallback"]
    again = MoEAE(ModelConfig(width=16, depth=2, n_experts=2))
    again.fallback.fill_(3.0)
    again.load_state_dict(sd)
    assert (again.fallback == 0).all()


def test_fused_adam_skips_parameters_without_gradients():
    from moeae.optim import FusedAdam

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours, ref = FusedAdam(a, lr=1e-2), torch.optim.Adam(b, lr=1e-2)
    for step in range(4):
        for i, (p, q) in enumerate(zip(a, b)):
            g = None if (i == 1 and step in (1, 2)) else torch.randn_like(p)
            p.grad, q.grad = (None, None) if g is None else (g.clone(), g.clone())
        ours.step()
        ref.step()
    for p, q in zip(a, b):
        np.testing.assert_allclose(p.detach(), q.detach(), atol=1e-6)
    assert [float(s) for s in ours.steps] == [4.0, 2.0]


def test_fused_adam_equals_torch_adam():
    from moeae.optim import FusedAdam

    for wd in (0.0, 0.01):
        torch.manual_seed(0)
        a = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
        b = [torch.nn.Parameter(p.detach().clone()) for p in a]
        ours = FusedAdam(a, lr=1e-2, weight_decay=wd)
        ref = (torch.optim.AdamW if wd else torch.optim.Adam)(b, lr=1e-2, weight_decay=wd)
        for step in range(5):
            for p, q in zip(a, b):
                g = torch.randn_like(p)
                p.grad, q.grad = g.clone(), g.clone()
            ours.lr = ref.param_groups[0]["lr"] = 1e-2 / (step + 1)
            ours.step()
            ref.step()
        for p, q in zip(a, b):
            np.testing.assert_allclose(p.detach(), q.detach(), atol=1e-6)
        sd = ours.state_dict()
        again = FusedAdam([torch.nn.Parameter(p.detach().clone()) for p in a])
        again.load_state_dict(sd)
        assert again.lr == ours.lr and torch.equal(again.exp_avg[0], ours.exp_avg[0])


@pytest.mark.parametrize("name", ["seed", "best"])
def test_training_lowers_the_loss_and_the_test_error(name):
    from moeae.datasets import make_circle
    from moeae.training import evaluate

    X, _ = make_circle(300, random_state=0)
    X_te, _ = make_circle(300, grid=True)
    mc, tc = recipe(name, epochs=15, width=32, depth=2, n_experts=2)
    tr = Trainer(MoEAE(mc), tc, [0])
    Xt = torch.tensor(X[None], dtype=torch.float32)
    Xe = torch.tensor(X_te[None], dtype=torch.float32)
    tr.initialize(Xt)

    def mse_soft():
        ev = evaluate(tr.model, Xe)
        return ((ev["x_soft"] - ev["inputs"]) ** 2).mean()

    before = mse_soft()
    tr.fit(Xt, 15)
    losses = [h[0] for h in tr.state.history]
    assert losses[-1] < 0.7 * losses[0], losses
    assert mse_soft() < 0.5 * before


def test_loss_terms_by_construction():
    from moeae.training import LossTerms

    valid = torch.tensor([[True, True, True, True]])
    balanced = torch.eye(4).repeat(2, 1)[None] * 0.5 + 0.125  # each expert top for 2 of 8
    collapsed = torch.zeros(1, 8, 4)
    collapsed[..., 0] = 1.0
    assert LossTerms.load_balance(balanced, valid).item() == pytest.approx(1.0)
    assert LossTerms.load_balance(collapsed, valid).item() == pytest.approx(4.0)
    logits = torch.tensor([[[1.0, -1.0, float("-inf")], [3.0, 1.0, float("-inf")]]])
    valid3 = torch.tensor([[True, True, False]])
    # batch means (2, 0) over the two real experts: (4 + 0) / 2
    assert LossTerms.router_mean_logits(logits, valid3).item() == pytest.approx(2.0)
    x = torch.zeros(1, 4, 2)
    assert LossTerms.reconstruction(x + 2.0, x, torch.full((1, 1, 1), 2.0)).item() == 1.0


def test_placed_units_bend_at_the_quantiles_of_their_charts_codes():
    cfg = ModelConfig(n_features=2, n_experts=3, latent_dim=1, width=16, depth=2)
    model = MoEAE(cfg, [3, 2])
    model.reset_parameters([0, 1])
    rng = np.random.default_rng(0)
    coords = np.full((2, 50, 3, 1), np.nan)
    coords[0, :40, 0, 0] = rng.uniform(-0.8, 0.8, 40)
    coords[0, 10:, 1, 0] = rng.normal(0, 0.3, 40)
    coords[0, :5, 2, 0] = rng.uniform(-0.8, 0.8, 5)  # too few: left as initialised
    coords[1, :, 0, 0] = rng.uniform(-0.5, 0.2, 50)
    first = model.decoder.linears()[0]
    w0, b0 = first.weight.detach().clone(), first.bias.detach().clone()
    model.place_units(torch.as_tensor(coords), [0, 1])
    assert torch.equal(first.weight, w0)
    H = cfg.width
    for g, (m, e) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]):
        c = coords[m, :, e, 0]
        c = c[~np.isnan(c)]
        if len(c) < 8:
            assert torch.equal(first.bias[g], b0[g])
            continue
        kinks = np.sort((-first.bias[g, 0] / first.weight[g, 0]).detach().double().numpy())
        np.testing.assert_allclose(kinks, np.quantile(c, (np.arange(H) + 0.5) / H), rtol=1e-5,
                                   atol=1e-6)
    # each model as it would be alone (its own seed and codes)
    alone = MoEAE(cfg, [2])
    alone.reset_parameters([1])
    alone.place_units(torch.as_tensor(coords[1:, :, :2]), [1])
    torch.testing.assert_close(alone.decoder.linears()[0].bias[0], first.bias[3])
    # surfaces keep their units
    surface = MoEAE(ModelConfig(n_features=3, n_experts=2, latent_dim=2, width=16), [2])
    surface.reset_parameters([0])
    b = surface.decoder.linears()[0].bias.detach().clone()
    surface.place_units(torch.zeros(1, 20, 2, 2), [0])
    assert torch.equal(surface.decoder.linears()[0].bias, b)


def test_the_best_recipe_starts_curve_decoders_bending_among_their_codes():
    from moeae import datasets as ds

    X, _ = ds.make_circle(200, random_state=0)
    mc, tc = recipe("best", n_features=2, n_experts=2, latent_dim=1, seed=0, device="cpu")
    assert tc.place_units
    kinks = {}
    for place in (False, True):
        tc.place_units = place
        tr = Trainer(MoEAE(mc, [2]), tc, [0], torch.device("cpu"))
        tr.initialize(tr.data(X))
        first = tr.model.decoder.linears()[0]
        kinks[place] = (-first.bias[:, 0] / first.weight[:, 0]).detach().numpy()  # (G, H)
        codes = tr.coords[0].numpy()  # (n, E, 1)
    for g in range(2):
        lo, hi = np.nanmin(codes[:, g, 0]), np.nanmax(codes[:, g, 0])
        assert ((kinks[True][g] >= lo) & (kinks[True][g] <= hi)).all()
        # as initialised, most bend outside the codes the chart uses
        assert ((kinks[False][g] < lo) | (kinks[False][g] > hi)).mean() > 0.5


def test_held_units_stay_where_they_were_placed():
    """``hold_units`` (best): the placed first layer of curve decoders is not trained; the rest
    is. Surfaces, and curves whose units were not placed, train every layer."""
    from moeae import datasets as ds

    X, _ = ds.make_circle(200, random_state=0)
    mc, tc = recipe("best", n_features=2, n_experts=2, latent_dim=1, seed=0, epochs=3,
                    device="cpu")
    assert tc.place_units and tc.hold_units
    tr = Trainer(MoEAE(mc, [2]), tc, [0], torch.device("cpu"))
    assert tr.holds_units
    data = tr.data(X)
    tr.initialize(data)
    first, second = tr.model.decoder.linears()[:2]
    placed = [t.detach().clone() for t in (first.weight, first.bias, second.weight)]
    tr.fit(data, 3)
    assert torch.equal(first.weight, placed[0]) and torch.equal(first.bias, placed[1])
    assert not torch.equal(second.weight, placed[2])
    tc_free = dataclasses.replace(tc, hold_units=False)
    assert not Trainer(MoEAE(mc, [2]), tc_free, [0], torch.device("cpu")).holds_units
    unplaced = dataclasses.replace(tc, place_units=False)
    assert not Trainer(MoEAE(mc, [2]), unplaced, [0], torch.device("cpu")).holds_units
    ms, ts = recipe("best", n_features=3, n_experts=2, latent_dim=2, seed=0, device="cpu")
    surface = Trainer(MoEAE(ms, [2]), ts, [0], torch.device("cpu"))
    assert not surface.holds_units
    assert all(p.requires_grad for p in surface.model.parameters())
