"""Checkpoints: bit-identical resume, kill -9 at any moment, atomic writes, and corrupt,
truncated or planted (pickle) files refused with a clear error and nothing executed."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAIN_TINY, assert_error, planted_pickle
from safetensors.numpy import load_file

from moeae import MoEAutoencoder
from moeae.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    load_npz,
    save_checkpoint,
)

CKPT = "checkpoint.safetensors"


def tensors(run: Path, prefix: str = "model.") -> dict[str, np.ndarray]:
    return {k: v for k, v in load_file(run / CKPT).items() if k.startswith(prefix)}


def assert_same_tensors(a: Path, b: Path, prefix: str = "model.") -> None:
    ta, tb = tensors(a, prefix), tensors(b, prefix)
    assert ta and ta.keys() == tb.keys()
    different = [k for k in ta if not np.array_equal(ta[k], tb[k], equal_nan=True)]
    assert not different, f"{prefix}* tensors differ: {different}"


def encoded(cli, run: Path, tiny_points: Path, out: Path) -> np.ndarray:
    res = cli("encode", run, tiny_points, out)
    assert res.returncode == 0, res
    return np.load(out)


def stale_tmp(run: Path) -> list[Path]:
    return sorted(run.glob(".*.tmp")) + sorted(run.glob("snapshots/.*.tmp"))


def metric_epochs(run: Path) -> list[int]:
    return [r["epoch"] for r in json.loads((run / "metrics.json").read_text())]


# -- 6. resume equality ------------------------------------------------------------------------
def test_resume_extends_seed_recipe_bit_identically(cli, tmp_path, tiny_points):
    a, b = tmp_path / "A", tmp_path / "B"
    base = (*TRAIN_TINY, "--seed", "3")
    assert cli("train", *base, "--epochs", "2", "--out", a).returncode == 0
    res = cli("train", "--resume", a, "--epochs", "4")
    assert res.returncode == 0 and "4 epochs" in res.stdout, res
    assert cli("train", *base, "--epochs", "4", "--out", b).returncode == 0
    for prefix in ("model.", "optim.", "rng."):
        assert_same_tensors(a, b, prefix)
    np.testing.assert_array_equal(encoded(cli, a, tiny_points, tmp_path / "a.npy"),
                                  encoded(cli, b, tiny_points, tmp_path / "b.npy"))
    assert metric_epochs(a) == [1, 2, 3, 4]
    # epoch 2 was A's last planned epoch, so its row also has the neighbourhood metrics
    rows_a, rows_b = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert rows_a[2:] == rows_b[2:]
    assert json.loads((a / "config.json").read_text())["train"]["epochs"] == 4


# A `moeae train` that kills itself with SIGKILL when it is about to rename its Nth checkpoint
# into place: the temporary file is complete, the old checkpoint not yet replaced.
KILL_AT_CHECKPOINT_WRITE = r"""
import os, signal, sys
n, real_replace = [0], os.replace
def replace(src, dst):
    if os.path.basename(dst) == "checkpoint.safetensors":
        n[0] += 1
        if n[0] == int(os.environ["KILL_AT_WRITE"]):
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
os.replace = replace
from moeae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_mid_write_then_resume_keeps_plan_best_recipe(cli, tmp_path, tiny_points):
    """Default recipe (cosine schedule, spectral init): killed while writing the epoch-3
    checkpoint, ``--resume`` without ``--epochs`` finishes the planned 4 epochs exactly as an
    uninterrupted run."""
    a, b = tmp_path / "A", tmp_path / "B"
    args = ("train", "--data", "circle", "--experts", "2", "--n-samples", "200", "--seed", "3",
            "--epochs", "4", "--threads", "1")
    # checkpoint writes: epoch 0 (before training), 1, 2, 3 -> the 4th is epoch 3's
    p = subprocess.run([sys.executable, "-c", KILL_AT_CHECKPOINT_WRITE, *args, "--out", str(a)],
                       env={**os.environ, "KILL_AT_WRITE": "4"}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert load_checkpoint(a / CKPT)["meta"]["state"]["epoch"] == 2  # the old one, intact
    (tmp,) = stale_tmp(a)  # the cut write: complete, never renamed into place
    assert tmp.name.startswith(f".{CKPT}.")
    assert load_checkpoint(tmp)["meta"]["state"]["epoch"] == 3
    assert (a / "snapshots" / "epoch_0003.npz").exists()  # written before the checkpoint

    res = cli("train", "--resume", a)
    assert res.returncode == 0 and "4 epochs" in res.stdout, res
    assert stale_tmp(a) == []
    assert cli(*args, "--out", b).returncode == 0
    for prefix in ("model.", "optim.", "rng.", "extra."):
        assert_same_tensors(a, b, prefix)
    np.testing.assert_array_equal(encoded(cli, a, tiny_points, tmp_path / "a.npy"),
                                  encoded(cli, b, tiny_points, tmp_path / "b.npy"))
    assert metric_epochs(a) == [1, 2, 3, 4]
    assert (a / "metrics.json").read_text() == (b / "metrics.json").read_text()
    for epoch in (3, 4):
        sa = load_npz(a / "snapshots" / f"epoch_{epoch:04d}.npz")
        sb = load_npz(b / "snapshots" / f"epoch_{epoch:04d}.npz")
        assert all(np.array_equal(sa[k], sb[k]) for k in sb)


def test_resume_that_would_go_back_changes_nothing(cli, tiny_run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)  # 1 epoch done, 1 planned
    config = (run / "config.json").read_bytes()
    assert_error(cli("train", "--resume", run, "--epochs", "0"), run, "already has 1 epochs")
    assert (run / "config.json").read_bytes() == config  # the plan was not rewritten
    res = cli("train", "--resume", run)  # nothing left to do
    assert res.returncode == 0 and "1 epochs" in res.stdout, res
    (run / CKPT).unlink()  # as if killed before the first checkpoint
    assert_error(cli("train", "--resume", run), "checkpoint not found", run / CKPT)


# -- 7. kill -9 at a random moment -------------------------------------------------------------
def test_kill_9_at_random_moment_then_resume(cli, tmp_path, tiny_points):
    run = tmp_path / "K"
    cmd = [sys.executable, "-m", "moeae.cli", "train", *TRAIN_TINY, "--seed", "3",
           "--epochs", "30", "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not (run / "snapshots" / "epoch_0002.npz").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "training did not reach epoch 2 in time"
            time.sleep(0.01)
        time.sleep(random.uniform(0.0, 0.3))  # any moment: maybe in the middle of a write
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    epoch = load_checkpoint(run / CKPT)["meta"]["state"]["epoch"]
    assert 1 <= epoch < 30
    target = epoch + 2
    res = cli("train", "--resume", run, "--epochs", target)
    assert res.returncode == 0 and f"{target} epochs" in res.stdout, res
    assert stale_tmp(run) == []
    assert metric_epochs(run) == list(range(1, target + 1))

    ref = tmp_path / "uninterrupted"
    assert cli("train", *TRAIN_TINY, "--seed", "3", "--epochs", target,
               "--out", ref).returncode == 0
    assert_same_tensors(run, ref)
    np.testing.assert_array_equal(encoded(cli, run, tiny_points, tmp_path / "k.npy"),
                                  encoded(cli, ref, tiny_points, tmp_path / "r.npy"))


# -- 4. corrupt and truncated checkpoints; 5. planted pickles ---------------------------------
def _damage(path: Path, kind: str, marker: Path) -> None:
    data = path.read_bytes()
    new = {"truncated": data[: len(data) // 2],
           "header_cut": data[:100],
           "random": np.random.default_rng(0).bytes(len(data)),
           "empty": b"",
           "pickle": planted_pickle(marker)}[kind]
    path.write_bytes(new)


KINDS = ["truncated", "header_cut", "random", "empty", "pickle"]


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_checkpoint_refused(cli, tiny_run_dir, tiny_points, tmp_path, kind):
    run, marker = tmp_path / "run", tmp_path / "MARKER"
    shutil.copytree(tiny_run_dir, run)
    _damage(run / CKPT, kind, marker)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for args in (("encode", run, tiny_points, tmp_path / "codes.npy"), ("evaluate", run),
                 ("train", "--resume", run), ("train", "--resume", run, "--epochs", "3")):
        assert_error(cli(*args), run / CKPT)
    assert not (tmp_path / "codes.npy").exists()
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    with pytest.raises(CheckpointError, match="checkpoint"):
        load_checkpoint(run / CKPT)
    assert not marker.exists()


def test_checkpoint_that_does_not_match_config(cli, tiny_run_dir, tiny_points, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    config = json.loads((run / "config.json").read_text())
    config["model"]["n_experts"] = 3
    (run / "config.json").write_text(json.dumps(config))
    for args in (("encode", run, tiny_points, tmp_path / "c.npy"), ("train", "--resume", run)):
        assert_error(cli(*args), run / CKPT, "does not match")


@pytest.mark.parametrize("name, content", [
    ("data.npz", "truncated"), ("data.npz", "pickle"), ("config.json", "{oops"),
    ("metrics.json", "[{"),
])
def test_damaged_run_files_refused(cli, tiny_run_dir, tmp_path, name, content):
    run, marker = tmp_path / "run", tmp_path / "MARKER"
    shutil.copytree(tiny_run_dir, run)
    if content == "truncated":
        (run / name).write_bytes((run / name).read_bytes()[:200])
    elif content == "pickle":
        (run / name).write_bytes(planted_pickle(marker))
    else:
        (run / name).write_text(content)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert_error(cli("train", "--resume", run, "--epochs", "2"), run / name)
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_planted_pickle_is_live(tmp_path):
    """The payload used in these tests really runs code when unpickled, so its refusal
    elsewhere means something."""
    marker = tmp_path / "MARKER"
    pickle.loads(planted_pickle(marker)).close()
    assert marker.exists()


@pytest.fixture(scope="module")
def estimator_file(tmp_path_factory) -> Path:
    X = np.random.default_rng(0).normal(size=(64, 2))
    est = MoEAutoencoder(n_experts=2, recipe="seed", epochs=1, random_state=0, device="cpu")
    path = tmp_path_factory.mktemp("est") / "model.safetensors"
    est.fit(X).save(path)
    return path


def test_estimator_round_trip(estimator_file):
    X = np.random.default_rng(1).normal(size=(10, 2))
    a, b = MoEAutoencoder.load(estimator_file), MoEAutoencoder.load(estimator_file)
    np.testing.assert_array_equal(a.transform(X), b.transform(X))


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_estimator_file_refused(estimator_file, tmp_path, kind):
    path, marker = tmp_path / "model.safetensors", tmp_path / "MARKER"
    shutil.copy(estimator_file, path)
    _damage(path, kind, marker)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        MoEAutoencoder.load(path)
    assert not marker.exists()


def test_run_checkpoint_is_not_an_estimator(tiny_run_dir):
    with pytest.raises(CheckpointError, match="not a saved MoEAutoencoder"):
        MoEAutoencoder.load(tiny_run_dir / CKPT)


def test_crafted_checkpoint_headers_refused(tmp_path):
    """Valid safetensors files with a wrong or malformed moeae header."""
    from safetensors.torch import save

    t = {"model.w": torch.zeros(2), "optim.x.step": torch.zeros(1)}
    for i, meta in enumerate([None, {"other": "1"}, {"moeae": "5"}, {"moeae": "{"},
                              {"moeae": json.dumps({"format": "moeae-checkpoint-1"})},
                              {"moeae": json.dumps({"format": "moeae-checkpoint-1",
                                                    "meta": {}, "param_groups": []})},
                              {"moeae": json.dumps({"format": "other"})}]):
        path = tmp_path / f"c{i}.safetensors"
        path.write_bytes(save(t, metadata=meta))
        with pytest.raises(CheckpointError, match=f"c{i}.safetensors"):
            load_checkpoint(path)


# -- atomic writes -----------------------------------------------------------------------------
def _ck(path: Path, value: float) -> None:
    save_checkpoint(path, model={"w": torch.full((3,), value)}, meta={"v": value})


def test_checkpoint_round_trip(tmp_path):
    model = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 4)}},
           "param_groups": [{"lr": 0.1, "params": [0]}]}
    rng = {"shuffle.0": torch.Generator().manual_seed(1).get_state()}
    save_checkpoint(tmp_path / CKPT, model=model, optimizer=opt, rng=rng, meta={"a": [1, 2]})
    ck = load_checkpoint(tmp_path / CKPT)
    assert all(torch.equal(ck["model"][k], v) for k, v in model.items())
    assert torch.equal(ck["optimizer"]["state"][0]["exp_avg"], opt["state"][0]["exp_avg"])
    assert ck["optimizer"]["param_groups"] == opt["param_groups"]
    assert torch.equal(ck["rng"]["shuffle.0"], rng["shuffle.0"]) and ck["meta"] == {"a": [1, 2]}


def test_failed_write_keeps_old_file_and_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / CKPT
    _ck(path, 1.0)
    old = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        _ck(path, 2.0)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert list(tmp_path.iterdir()) == [path]
    assert load_checkpoint(path)["meta"] == {"v": 1.0}


def test_written_files_get_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "new.bin", b"x")
        assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o644  # not mkstemp's 0600
        (tmp_path / "old.bin").write_bytes(b"old")
        os.chmod(tmp_path / "old.bin", 0o640)
        atomic_write_bytes(tmp_path / "old.bin", b"new")
        assert stat.S_IMODE((tmp_path / "old.bin").stat().st_mode) == 0o640
        assert (tmp_path / "old.bin").read_bytes() == b"new"
    finally:
        os.umask(umask)


def test_several_starts_resume_exactly_and_keep_the_best(tmp_path, monkeypatch):
    from moeae import run
    from moeae.config import recipe
    from moeae.datasets import make_figure8

    X, _ = make_figure8(200, random_state=0)
    mc, tc = recipe("best", n_features=2, n_experts=2, width=16, depth=2, epochs=4, n_init=2)
    run.train_run(tmp_path / "whole", X, mc, tc)
    record = run._Recorder.__call__

    def stop_after_two(self, trainer):
        record(self, trainer)
        if trainer.state.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(run._Recorder, "__call__", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        run.train_run(tmp_path / "cut", X, mc, tc)
    monkeypatch.undo()
    with pytest.raises(run.RunError, match="holds 2 starts still in training"):
        run.load_model(tmp_path / "cut")
    run.resume_run(tmp_path / "cut")
    whole, _ = run.load_model(tmp_path / "whole")
    cut, _ = run.load_model(tmp_path / "cut")
    for name, w in whole.state_dict().items():
        assert torch.equal(w, cut.state_dict()[name]), name
    # the kept start reconstructs the training data better than the other one
    errs = []
    for s in (0, 1):
        one = run.train_run(tmp_path / f"s{s}", X, mc, dataclasses.replace(tc, n_init=1,
                                                                            seed=s))
        m = one.model.double()
        x = torch.as_tensor(X)[None]
        _, xh, _ = m.codes(m(x, mix=False), x)  # the atlas's codes (arc length for curves)
        errs.append(float(((xh - x) ** 2).sum(-1).mean()))
    kept, _ = run.load_model(tmp_path / "whole")
    x = torch.as_tensor(X)[None]
    _, xh, _ = kept.codes(kept(x, mix=False), x)
    assert float(((xh - torch.as_tensor(X)[None]) ** 2).sum(-1).mean()) == \
        pytest.approx(min(errs), rel=1e-4)
