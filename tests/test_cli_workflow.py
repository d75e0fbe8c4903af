"""A user's own file through train, encode, decode and evaluate, as the README shows."""

import json

import numpy as np

from moeae.cli import main
from moeae.datasets import make_trefoil


def _fvu(X, X_hat):
    return ((X - X_hat) ** 2).sum(1).mean() / ((X - X.mean(0)) ** 2).sum(1).mean()


def test_3d_closed_curve_from_csv_and_npy(tmp_path, capsys):
    X, _ = make_trefoil(1000, noise=0.0, random_state=0)
    X_new, _ = make_trefoil(500, random_state=1)  # held-out points of the same curve
    csv_path = tmp_path / "curve.csv"
    np.savetxt(csv_path, X, delimiter=",", header="x,y,z", comments="")
    np.save(tmp_path / "new.npy", X_new)
    np.savetxt(tmp_path / "new.csv", X_new, delimiter=",")
    run = tmp_path / "run"
    assert main(["train", "--data", str(csv_path), "--experts", "4", "--out", str(run)]) == 0
    assert (run / "checkpoint.safetensors").is_file() and (run / "config.json").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["shape"] == [1000, 3] and config["model"]["latent_dim"] == 1
    for suffix in ("npy", "csv"):
        codes, back = tmp_path / f"codes.{suffix}", tmp_path / f"back.{suffix}"
        assert main(["encode", str(run), str(tmp_path / f"new.{suffix}"), str(codes)]) == 0
        assert main(["decode", str(run), str(codes), str(back)]) == 0
        if suffix == "npy":
            Z, X_back = np.load(codes), np.load(back)
        else:
            Z = np.loadtxt(codes, delimiter=",", skiprows=1)
            X_back = np.loadtxt(back, delimiter=",", skiprows=1)
        assert Z.shape == (500, 2) and set(np.unique(Z[:, 0])) <= {0, 1, 2, 3}
        fvu = _fvu(X_new, X_back)
        assert fvu <= 5e-4, f"hard FVU {fvu:.2e} through {suffix} files"
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["fvu_hard"] <= 5e-4 and metrics["experts_used"] >= 2


def test_experts_auto_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "circle", "--experts", "auto", "--n-samples", "400",
                 "--epochs", "2", "--out", str(out)]) == 0
    assert "--experts auto: 2 charts" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model"]["n_experts"] == 2


def test_a_chart_no_point_uses_is_switched_off():
    import torch

    from moeae.config import recipe
    from moeae.model import MoEAE
    from moeae.run import charts_in_use, encode, switch_off_unused

    mc, _ = recipe("best", n_features=2, n_experts=3, width=8, depth=1)
    model = MoEAE(mc).double()
    model.reset_parameters([0])
    with torch.no_grad():  # the router prefers chart 2 everywhere, then chart 0
        last = model.router.linears()[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([[[1.0, 0.0, 5.0]]]))
    X = np.random.default_rng(0).normal(size=(50, 2))
    np.testing.assert_array_equal(charts_in_use(model, X), [False, False, True])
    assert switch_off_unused(model, X) == 1
    with torch.no_grad():
        model.active[0] = torch.tensor([True, True, False])  # chart 2 off: 0 takes every point
    assert (encode(model, X)[:, 0] == 0).all()
    assert switch_off_unused(model, X) == 1 and model.active[0].tolist() == [True, False, False]
