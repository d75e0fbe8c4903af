"""The command line's error contract: exit 1 with one line ``error: ...`` that names the file,
shape or value (no traceback unless ``--debug``); exit 2 for usage errors (argparse's own)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from conftest import TRAIN_TINY, MarkerPickle, assert_error, assert_usage_error, planted_pickle

from moeae.checkpoint import load_checkpoint
from moeae.datasets import DATASETS

BAD_INPUT_NAMES = ["missing_npy", "missing_csv", "empty_npy", "empty_csv", "blank_csv",
                   "header_only_csv", "nonnumeric_csv", "nonnumeric_csv_no_header", "ragged_csv",
                   "nan_npy", "nan_csv", "inf_npy", "complex_npy", "object_npy", "oned_npy",
                   "threed_npy", "string_npy", "not_npy", "unsupported_suffix"]


# -- 1. input files ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", BAD_INPUT_NAMES)
def test_train_bad_input_file(cli, bad_inputs, tmp_path, case):
    path, fragments = bad_inputs[case]
    out = tmp_path / "run"
    res = cli("train", "--data", path, "--experts", "2", "--recipe", "seed", "--epochs", "1",
              "--out", out)
    assert_error(res, path, *fragments)
    assert not out.exists()  # nothing is created for data that is refused


@pytest.mark.parametrize("case", BAD_INPUT_NAMES)
def test_encode_bad_input_file(cli, bad_inputs, tiny_run_dir, tmp_path, case):
    path, fragments = bad_inputs[case]
    out = tmp_path / "codes.npy"
    assert_error(cli("encode", tiny_run_dir, path, out), path, *fragments)
    assert not out.exists()


@pytest.mark.parametrize("case", ["missing_npy", "nonnumeric_csv", "nan_npy", "object_npy",
                                  "oned_npy", "not_npy", "unsupported_suffix"])
def test_evaluate_and_decode_bad_input_file(cli, bad_inputs, tiny_run_dir, tmp_path, case):
    path, fragments = bad_inputs[case]
    assert_error(cli("evaluate", tiny_run_dir, "--data", path), path, *fragments)
    assert_error(cli("decode", tiny_run_dir, path, tmp_path / "x.npy"), path, *fragments)


def test_planted_pickle_npy_input_not_run(cli, tiny_run_dir, tmp_path):
    marker = tmp_path / "MARKER"
    (tmp_path / "raw.npy").write_bytes(planted_pickle(marker))
    obj = np.empty((2, 2), dtype=object)
    obj[:] = MarkerPickle(marker)
    np.save(tmp_path / "obj.npy", obj, allow_pickle=True)
    for name in ("raw.npy", "obj.npy"):
        assert_error(cli("encode", tiny_run_dir, tmp_path / name, tmp_path / "c.npy"), name)
        assert_error(cli("train", "--data", tmp_path / name, "--out", tmp_path / "run"), name)
        assert_error(cli("decode", tiny_run_dir, tmp_path / name, tmp_path / "x.npy"), name)
    assert not marker.exists()
    assert not (tmp_path / "run").exists() and not (tmp_path / "c.npy").exists()


def test_csv_with_and_without_header(cli, tiny_run_dir, tmp_path):
    X = np.random.default_rng(1).normal(size=(20, 2))
    body = "\n".join(",".join(f"{v:.17g}" for v in row) for row in X) + "\n"
    files = {"plain.csv": body, "header.csv": "x0,x1\n" + body,
             "spaced.csv": '"x0", "x1"\n\n' + body.replace(",", ", ") + "\n\n"}
    np.save(tmp_path / "same.npy", X)
    codes = {}
    for name in [*files, "same.npy"]:
        if name in files:
            (tmp_path / name).write_text(files[name])
        res = cli("encode", tiny_run_dir, tmp_path / name, tmp_path / f"{name}.codes.npy")
        assert res.returncode == 0, res
        codes[name] = np.load(tmp_path / f"{name}.codes.npy")
    for name in files:
        np.testing.assert_array_equal(codes[name], codes["same.npy"])
    # a CSV that `encode` writes (it has a header line) is valid input to `decode`
    res = cli("encode", tiny_run_dir, tmp_path / "header.csv", tmp_path / "codes.csv")
    assert res.returncode == 0 and (tmp_path / "codes.csv").read_text().startswith("chart,z0")
    res = cli("decode", tiny_run_dir, tmp_path / "codes.csv", tmp_path / "back.csv")
    assert res.returncode == 0, res
    assert np.loadtxt(tmp_path / "back.csv", delimiter=",", skiprows=1).shape == (20, 2)


def test_train_from_csv_with_header(cli, tmp_path):
    X = np.random.default_rng(2).normal(size=(40, 3))
    (tmp_path / "x.csv").write_text("a,b,c\n" + "\n".join(",".join(map(str, r)) for r in X))
    out = tmp_path / "run"
    res = cli("train", "--data", tmp_path / "x.csv", "--experts", "2", "--recipe", "seed",
              "--epochs", "1", "--out", out)
    assert res.returncode == 0, res
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["n_features"] == 3 and config["data"]["shape"] == [40, 3]


# -- 2. settings -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (("--experts", "0"), "--experts"),
    (("--epochs", "-1"), "--epochs"),
    (("--experts", "two"), "--experts"),
    (("--lr", "nan"), "--lr"),
    (("--grad-clip", "0"), "--grad-clip"),
])
def test_usage_errors_exit_2(cli, tmp_path, args, fragment):
    out = tmp_path / "run"
    assert_usage_error(cli("train", "--data", "circle", *args, "--out", out), fragment)
    assert not out.exists()


def test_train_needs_out_or_resume(cli, tmp_path):
    assert_usage_error(cli("train", "--data", "circle"), "--out")
    assert_usage_error(cli("train", "--resume", tmp_path, "--out", tmp_path / "x"), "--resume")


@pytest.mark.parametrize("k", [2, 3])
def test_latent_dim_not_smaller_than_features(cli, tmp_path, k):
    out = tmp_path / "run"
    line = assert_error(cli("train", "--data", "circle", "--latent-dim", k, "--out", out),
                        "latent_dim")
    assert re.search(rf"\b{k}\b.*\b2\b", line), line  # both numbers, latent first
    assert not out.exists()


def test_unknown_dataset_lists_valid_names(cli, tmp_path):
    line = assert_error(cli("train", "--data", "circel", "--out", tmp_path / "run"), "'circel'")
    for name in DATASETS:
        assert name in line


# -- 3. encode / decode ------------------------------------------------------------------------
def test_encode_missing_run_folder(cli, tiny_points, tmp_path):
    missing = tmp_path / "no_such_run"
    assert_error(cli("encode", missing, tiny_points, tmp_path / "c.npy"), missing)
    (tmp_path / "empty_dir").mkdir()
    assert_error(cli("encode", tmp_path / "empty_dir", tiny_points, tmp_path / "c.npy"),
                 tmp_path / "empty_dir", "config.json")
    assert_error(cli("evaluate", missing), missing)
    assert_error(cli("train", "--resume", missing), missing)


def test_encode_wrong_width(cli, tiny_run_dir, tmp_path):
    np.save(tmp_path / "wide.npy", np.ones((5, 3)))
    assert_error(cli("encode", tiny_run_dir, tmp_path / "wide.npy", tmp_path / "c.npy"),
                 tmp_path / "wide.npy", "has 3 features", "expects 2")
    assert not (tmp_path / "c.npy").exists()
    assert_error(cli("evaluate", tiny_run_dir, "--data", tmp_path / "wide.npy"),
                 tmp_path / "wide.npy", "has 3 features", "expects 2")


@pytest.mark.parametrize("chart, shown", [(5, "5"), (-1, "-1"), (2, "2"), (0.5, "0.5")])
def test_decode_chart_out_of_range(cli, tiny_run_dir, tmp_path, chart, shown):
    np.save(tmp_path / "codes.npy", np.array([[0, 0.1], [1, -0.2], [chart, 0.3]]))
    line = assert_error(cli("decode", tiny_run_dir, tmp_path / "codes.npy", tmp_path / "x.npy"),
                        tmp_path / "codes.npy", f"chart index {shown}", "row 2", "0..1")
    assert not (tmp_path / "x.npy").exists(), line


def test_decode_wrong_width(cli, tiny_run_dir, tmp_path):
    np.save(tmp_path / "codes.npy", np.zeros((3, 3)))
    assert_error(cli("decode", tiny_run_dir, tmp_path / "codes.npy", tmp_path / "x.npy"),
                 "(n, 2)", "(3, 3)")


def test_unsupported_output_suffix(cli, tiny_run_dir, tiny_points, tmp_path):
    assert_error(cli("encode", tiny_run_dir, tiny_points, tmp_path / "codes.xyz"), "'.xyz'")


def test_debug_shows_traceback(cli, tiny_run_dir, tmp_path):
    np.save(tmp_path / "wide.npy", np.ones((5, 3)))
    res = cli("encode", tiny_run_dir, tmp_path / "wide.npy", tmp_path / "c.npy", "--debug")
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "DataError" in res.stderr, res


def test_fresh_interpreter_same_contract(cli, tiny_run_dir, bad_inputs, tmp_path):
    """The forked test server hides nothing: a new ``python -m moeae.cli`` behaves the same
    (no import-time warnings on stderr, the same exit codes). test_checkpoints.py runs
    more commands in new interpreters (kill -9)."""
    path, fragments = bad_inputs["nonnumeric_csv"]
    assert_error(cli("encode", tiny_run_dir, path, tmp_path / "c.npy", fresh=True),
                 path, *fragments)
    assert_usage_error(cli("train", "--data", "circle", "--experts", "0", "--out",
                           tmp_path / "r", fresh=True), "--experts")


# -- 8. divergence -----------------------------------------------------------------------------
def test_divergence_names_epoch_and_step(cli, tmp_path, tiny_points):
    out = tmp_path / "run"
    res = cli("train", "--data", "spiral", "--experts", "2", "--recipe", "seed",
              "--n-samples", "200", "--epochs", "2", "--lr", "1e6", "--out", out)
    line = assert_error(res, "diverged", "non-finite")
    assert re.search(r"epoch \d+, step \d+", line), line
    ck = load_checkpoint(out / "checkpoint.safetensors")  # the last good one (epoch 0)
    assert ck["meta"]["state"]["epoch"] < 2
    assert all(np.isfinite(t.numpy()).all() for t in ck["model"].values())
    res = cli("encode", out, tiny_points, tmp_path / "codes.npy")
    assert res.returncode == 0, res


def test_grad_clip_accepted(cli, tmp_path):
    out = tmp_path / "run"
    res = cli("train", *TRAIN_TINY, "--epochs", "1", "--grad-clip", "0.5", "--out", out)
    assert res.returncode == 0, res
    assert json.loads((out / "config.json").read_text())["train"]["grad_clip"] == 0.5
    assert load_checkpoint(out / "checkpoint.safetensors")["meta"]["state"]["epoch"] == 1


# -- 9. a non-empty --out folder ---------------------------------------------------------------
def _tree(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file()}


def test_nonempty_out_refused_then_forced(cli, tiny_run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir, out)
    (out / "notes.txt").write_text("my notes\n")
    (out / "mine").mkdir()
    (out / "mine" / "keep.npy").write_bytes(b"not ours")
    before = _tree(out)
    args = ("train", *TRAIN_TINY, "--epochs", "1", "--seed", "5", "--out", out)
    assert_error(cli(*args), out, "--force")
    assert _tree(out) == before  # untouched, byte for byte

    (out / ".checkpoint.safetensors.abc123.tmp").write_bytes(b"left by a killed writer")
    res = cli(*args, "--force")
    assert res.returncode == 0, res
    after = _tree(out)
    assert after["notes.txt"] == before["notes.txt"]
    assert after["mine/keep.npy"] == before["mine/keep.npy"]
    assert after["checkpoint.safetensors"] != before["checkpoint.safetensors"]
    assert json.loads(after["config.json"])["train"]["seed"] == 5
    assert not list(out.glob(".*.tmp"))

    (tmp_path / "afile").write_text("x")
    assert_error(cli("train", *TRAIN_TINY, "--out", tmp_path / "afile"), "afile", "not a folder")
