"""Solved output layers (moeae.readout): the leave-one-out choice, and what a refit changes."""

import numpy as np
import pytest
import torch

from moeae import datasets as ds
from moeae.config import recipe
from moeae.model import MoEAE
from moeae.readout import ACCEPT, leave_one_out, refit_outputs, solve
from moeae.training import Trainer


def test_leave_one_out_matches_refitting_without_each_point():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 5, generator=g, dtype=torch.float64)
    R = torch.randn(30, 3, generator=g, dtype=torch.float64)
    B = 0.3 * torch.randn(20, 5, generator=g, dtype=torch.float64)  # rows held at no change
    lams = [1e-3, 0.5, 10.0]
    for rows in (None, B):
        got = leave_one_out(A, R, lams, rows)
        for lam, value in zip(lams, got):
            errs = []
            for i in range(len(A)):
                keep = torch.arange(len(A)) != i
                Ak, Rk = A[keep], R[keep]
                if rows is not None:
                    Ak, Rk = torch.cat([Ak, rows]), torch.cat([Rk, torch.zeros(len(rows), 3,
                                                                           dtype=R.dtype)])
                W = torch.linalg.solve(Ak.T @ Ak + lam * torch.eye(5, dtype=A.dtype), Ak.T @ Rk)
                errs.append(float(((A[i] @ W - R[i]) ** 2).sum()))
            assert float(value) == pytest.approx(np.mean(errs), rel=1e-10)


def test_a_residual_the_features_explain_is_solved_and_noise_is_left_alone():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(200, 11, generator=g, dtype=torch.float64)
    W = torch.randn(11, 4, generator=g, dtype=torch.float64)
    dW, lam, ratio = solve(A, A @ W)
    assert dW is not None and ratio < 1e-6
    torch.testing.assert_close(dW, W, rtol=1e-6, atol=1e-6)
    # residuals the features cannot predict: the trained weights stay
    dW, lam, ratio = solve(A, torch.randn(200, 4, generator=g, dtype=torch.float64))
    assert dW is None and ratio > ACCEPT


def _trained(X, refit, epochs=30, n_experts=2, seeds=(0,)):
    mc, tc = recipe("best", n_features=X.shape[1], n_experts=n_experts, latent_dim=1,
                    epochs=epochs, seed=seeds[0], refit_outputs=refit, device="cpu",
                    arc_length=False)  # the encoders' codes, which the solve reads
    tr = Trainer(MoEAE(mc, [n_experts] * len(seeds)), tc, list(seeds), torch.device("cpu"))
    data = tr.data(X)
    tr.initialize(data)
    tr.fit(data, tc.epochs)
    return tr.model


def _fvu(model, X, kind="hard"):
    from moeae.training import evaluate

    ev = evaluate(model, torch.as_tensor(X, dtype=torch.float32)[None])
    err = ((ev[f"x_{kind}"][0] - X) ** 2).sum(1).mean()
    return err / ((X - X.mean(0)) ** 2).sum(1).mean()


def test_a_refit_changes_only_the_output_layers_and_reconstructs_closer():
    X, _ = ds.make_circle(400, random_state=0)
    grid, _ = ds.make_circle(1000, grid=True)
    plain, solved = _trained(X, False), _trained(X, True)
    changed = {n for n, p in solved.state_dict().items()
               if not torch.equal(p, plain.state_dict()[n])}
    assert changed <= {"decoder.layers.4.weight", "decoder.layers.4.bias", "fallback"}
    assert {"decoder.layers.4.weight", "decoder.layers.4.bias"} <= changed
    # measured: 3.0e-5 -> 3.2e-6 on the grid of new points
    assert _fvu(solved, grid) < 0.2 * _fvu(plain, grid)
    assert _fvu(solved, grid) < 1e-5
    # off its chart a decoder stays near what it was trained to: the soft blend, which mixes
    # every chart in by the router's probability, is no worse
    assert _fvu(solved, grid, "soft") < 2 * _fvu(plain, grid, "soft")


def test_noisy_points_keep_the_trained_layers():
    X, _ = ds.make_circle(400, random_state=0)
    X = X + 0.05 * np.random.default_rng(0).standard_normal(X.shape)
    model = _trained(X, False)
    before = model.decoder.layers[-1].weight.detach().clone()
    report = refit_outputs(model, torch.as_tensor(X, dtype=torch.float32)[None])
    assert [r["refit"] for r in report] == [False, False]
    assert all(r["ratio"] > ACCEPT for r in report)
    assert sum(r["points"] for r in report) == len(X)
    assert torch.equal(model.decoder.layers[-1].weight, before)


def test_each_model_of_a_population_is_refitted_as_it_would_be_alone():
    X, _ = ds.make_circle(300, random_state=0)
    pop = _trained(X, False, seeds=(0, 1))
    x = torch.as_tensor(X, dtype=torch.float32)
    alone = [pop.select(m) for m in range(2)]
    both = refit_outputs(pop, x[None].expand(2, -1, -1).contiguous())
    for m, one in enumerate(alone):
        mine = refit_outputs(one, x[None])
        assert [r["refit"] for r in mine] == [r["refit"] for r in both[2 * m:2 * m + 2]]
        torch.testing.assert_close(pop.select(m).decoder.layers[-1].weight,
                                   one.decoder.layers[-1].weight, rtol=1e-4, atol=1e-5)


def test_the_underfit_check_reads_the_agreement_of_the_layers_as_trained():
    from moeae.run import decode, encode
    from moeae.tears import atlas_check, residual_agreement

    X, _ = ds.make_circle(400, random_state=0)
    model = _trained(X, False).double()
    assert torch.isnan(model.trained_agreement).all()  # never solved: the check's own
    codes = encode(model, X)
    before = residual_agreement(codes, X - decode(model, codes))
    assert atlas_check(model, X)["agreement"] == pytest.approx(before)
    report = refit_outputs(model, torch.as_tensor(X)[None])
    assert any(r["refit"] for r in report)
    assert float(model.trained_agreement[0]) == pytest.approx(before, rel=1e-9)
    codes = encode(model, X)
    after = residual_agreement(codes, X - decode(model, codes))
    assert abs(after - before) > 0.1  # the solve takes out what neighbours shared
    assert atlas_check(model, X)["agreement"] == pytest.approx(before, rel=1e-9)
    assert float(model.select(0).trained_agreement[0]) == pytest.approx(before, rel=1e-6)
    # a diagnostic of the fit, not saved: a loaded model is checked on its own residuals
    assert "trained_agreement" not in model.state_dict()
    loaded = MoEAE(model.cfg, model.counts).double()
    loaded.load_state_dict(model.state_dict())
    assert atlas_check(loaded, X)["agreement"] == pytest.approx(after)
