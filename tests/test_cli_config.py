"""``moeae train --config FILE.toml`` and the progress bar switch.

The file gives every setting, the command line overrides only what it states, an unknown key
is one line naming the file and the key, and config.json holds the resolved settings."""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys

import pytest
from conftest import CLI, assert_error, assert_usage_error

from moeae.cli import show_progress
from moeae.config import ConfigError, merge_settings, read_config_file

FAST = """
data = "circle"
recipe = "seed"
seed = 3
n_samples = 200
noise = 0.01

[model]
n_experts = 3
width = 16
depth = 2

[train]
epochs = 2
lr = 0.002
batch_size = 50
"""


def _write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_file_settings_reach_config_json(cli, tmp_path):
    path = _write(tmp_path, f'out = "{tmp_path / "run"}"\n' + FAST)  # before the tables
    res = cli("train", "--config", path, "--threads", "1")
    assert res.returncode == 0, res
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["n_experts"] == 3 and config["model"]["width"] == 16
    assert config["model"]["depth"] == 2 and config["model"]["dropout"] == 0.1  # seed recipe
    assert config["train"] == {**config["train"], "epochs": 2, "lr": 0.002, "batch_size": 50,
                               "seed": 3}
    assert config["data"] == {"name": "circle", "n_samples": 200, "noise": 0.01,
                              "random_state": 3, "manifold_dim": 1}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics] == [1, 2]


def test_command_line_overrides_only_what_it_states(cli, tmp_path):
    path = _write(tmp_path, f'out = "{tmp_path / "ignored"}"\n' + FAST)
    out = tmp_path / "run"
    res = cli("train", "--config", path, "--epochs", "1", "--lr", "0.01", "--experts", "2",
              "--out", out, "--threads", "1")
    assert res.returncode == 0, res
    assert not (tmp_path / "ignored").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["epochs"] == 1 and config["train"]["lr"] == 0.01
    assert config["model"]["n_experts"] == 2
    # what the command line did not state comes from the file, not from argparse defaults
    assert config["train"]["seed"] == 3 and config["train"]["batch_size"] == 50
    assert config["model"]["width"] == 16 and config["data"]["n_samples"] == 200
    assert config["model"]["dropout"] == 0.1  # from the file's recipe, "seed", not "best"


def test_example_file_is_valid():
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "trefoil.toml")
    settings = read_config_file(example)
    assert settings["data"] == "trefoil" and settings["model"]["n_experts"] == 4
    assert settings["train"]["lr"] == 3e-3


@pytest.mark.parametrize("text, fragments", [
    ('data = "circle"\nepoch = 3\n', ("unknown key 'epoch'", "valid top-level keys: data")),
    ('[train]\nlr_max = 1\n', ("unknown key 'train.lr_max'", "valid keys in [train]: epochs")),
    ('[model]\nexperts = 2\n', ("unknown key 'model.experts'", "n_experts")),
    ('[optim]\nlr = 1\n', ("unknown key 'optim'",)),
    ('[train]\nepochs = "100"\n', ("train.epochs must be an integer, got '100'",)),
    ('[train]\nepochs = 1.5\n', ("train.epochs must be an integer, got 1.5",)),
    ('[model]\noutput_dropout = 1\n', ("model.output_dropout must be true or false, got 1",)),
    ('seed = true\n', ("seed must be an integer, got True",)),
    ('[model]\nn_features = 3\n', ("model.n_features cannot be set", "width of the data")),
    ('[train]\nseed = 3\n', ("train.seed cannot be set", "top-level seed")),
    ('recipe = "fast"\n', ("unknown recipe 'fast'", "best")),
    ('model = 3\n', ("model must be a table",)),
    ('data = "circle"\nout = \n', ("not valid TOML", "line 2")),
])
def test_bad_file_is_one_line_naming_the_key(cli, tmp_path, text, fragments):
    path = _write(tmp_path, text)
    out = tmp_path / "run"
    res = cli("train", "--config", path, "--data", "circle", "--out", out)
    assert_error(res, path, *fragments)
    assert not out.exists()


def test_missing_or_unreadable_file(cli, tmp_path):
    assert_error(cli("train", "--config", tmp_path / "none.toml"), "none.toml", "no such file")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
    assert_error(cli("train", "--config", tmp_path / "bin.toml"), "bin.toml", "cannot read")


def test_usage_errors_with_config(cli, tmp_path):
    path = _write(tmp_path, 'data = "circle"\n')
    assert_usage_error(cli("train", "--config", path), "--out", "--config file")
    assert_usage_error(cli("train", "--resume", tmp_path, "--config", path), "--config")


def test_merge_settings_ignores_none():
    base = {"data": "a.npy", "seed": 1, "model": {"width": 8}, "train": {"lr": 0.1}}
    merged = merge_settings(base, {"data": None, "seed": 2, "model": {"width": None,
                                                                     "depth": 3},
                                   "train": {"lr": 0.5}})
    assert merged == {"data": "a.npy", "seed": 2, "model": {"width": 8, "depth": 3},
                      "train": {"lr": 0.5}}
    assert base["model"] == {"width": 8}  # not changed in place
    with pytest.raises(ConfigError):
        read_config_file(os.devnull + ".none.toml")


# -- progress bars -------------------------------------------------------------------------------
def test_show_progress_follows_the_terminal(monkeypatch):
    ns = argparse.Namespace
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert show_progress(ns(progress=None)) is True
    assert show_progress(ns(progress=False)) is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert show_progress(ns(progress=None)) is False
    assert show_progress(ns(progress=True)) is True


def test_progress_bar_forced_on_and_off(cli, tmp_path):
    args = ("train", "--data", "circle", "--recipe", "seed", "--n-samples", "100", "--experts",
            "2", "--epochs", "2", "--threads", "1")
    res = cli(*args, "--out", tmp_path / "a")  # stderr is a file here: no bar
    assert res.returncode == 0 and res.stderr == "", res
    res = cli(*args, "--out", tmp_path / "b", "--progress")
    assert res.returncode == 0 and "2/2" in res.stderr and "epoch" in res.stderr, res


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_progress_bar_on_by_default_on_a_terminal(tmp_path):
    """A new interpreter whose stderr is a terminal draws the bar; --no-progress does not."""
    import fcntl
    import termios

    args = ["train", "--data", "circle", "--recipe", "seed", "--n-samples", "100",
            "--experts", "2", "--epochs", "2", "--threads", "1"]
    seen = {}
    for flag in ("", "--no-progress"):
        master, slave = os.openpty()
        # a new pty is 0 x 0 characters, where tqdm draws nothing; a terminal has a size
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        proc = subprocess.Popen(CLI + args + ["--out", str(tmp_path / f"run{flag}")] +
                                ([flag] if flag else []), stdout=subprocess.DEVNULL,
                                stderr=slave, stdin=subprocess.DEVNULL)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other end closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        assert proc.wait(timeout=120) == 0
        seen[flag] = b"".join(chunks).decode(errors="replace")
    assert "2/2" in seen[""] and "epoch" in seen[""], seen
    assert seen["--no-progress"] == "", seen
