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
