"""Data that parses but cannot train: one line that says what is wrong, exit 1, nothing
written, and no Python warning on stderr (unless ``--debug``)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_error

from moeae.data import DataError, check_data, check_trainable

RNG = np.random.default_rng(0)
CIRCLE = np.column_stack([np.cos(t := RNG.uniform(0, 2 * np.pi, 100)), np.sin(t)])


def _with(value):
    X = RNG.normal(size=(200, 2))
    X[5, 1] = value
    return X


CASES = {  # name: (array, experts, exact message after "FILE: ")
    "identical": (np.full((200, 2), 0.5), 2,
                  "all 200 points are identical; an atlas needs points that differ"),
    "float32_zero_variance": (1 + 1e-12 * np.eye(200, 2), 2,
                              "zero variance in float32: the 200 points differ by at most 1e-12,"
                              " below float32 precision at magnitude 1"),
    "fewer_distinct": (np.repeat(np.eye(3, 2), 10, axis=0), 4,
                       "fewer distinct points (3) than charts (4); use at most 3 experts"),
    "fewer_distinct_in_float32": (np.repeat(1 + 1e-12 * np.eye(3, 2), 10, axis=0) +
                                  np.repeat([[0, 0], [1, 0]], 15, axis=0), 4,
                                  "fewer distinct points in float32 (2) than charts (4); use at "
                                  "most 2 experts"),
    "overflows_float32": (_with(1e300), 2,
                          "value 1e+300 at row 5, column 1 overflows float32 (largest magnitude "
                          "1e+300; float32 holds up to 3.4e+38)"),
    "squares_overflow": (_with(-1e30), 2,
                         "value -1e+30 at row 5, column 1 is too large to train on in float32: "
                         "squared distances overflow above 6.5e+18 (largest magnitude 1e+30); "
                         "rescale the data"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_refuses_with_one_line(cli, tmp_path, case):
    X, experts, message = CASES[case]
    path = tmp_path / f"{case}.npy"
    np.save(path, X)
    out = tmp_path / "run"
    res = cli("train", "--data", path, "--experts", experts, "--epochs", "2", "--threads", "1",
              "--out", out)
    line = assert_error(res, path)
    assert line.endswith(f"{case}.npy: {message}"), line
    assert "Warning" not in res.stderr and "diverged" not in line
    assert not out.exists()  # refused before the run folder is made


@pytest.mark.parametrize("recipe", ["seed", "best"])
def test_identical_points_both_recipes(cli, tmp_path, recipe):
    """The seed recipe used to train on them silently; the best recipe said 'diverged'."""
    np.save(tmp_path / "same.npy", np.ones((200, 3)))
    res = cli("train", "--data", tmp_path / "same.npy", "--experts", "2", "--recipe", recipe,
              "--out", tmp_path / "run", "--threads", "1")
    assert_error(res, "same.npy: all 200 points are identical")


def test_overflow_in_csv_and_encode(cli, tiny_run_dir, tmp_path):
    (tmp_path / "big.csv").write_text("x,y\n1,2\n3,4e300\n")
    line = assert_error(cli("encode", tiny_run_dir, tmp_path / "big.csv", tmp_path / "c.npy"))
    assert line == (f"error: {tmp_path / 'big.csv'}: value 4e+300 at row 1, column 1 overflows "
                    "float32 (largest magnitude 4e+300; float32 holds up to 3.4e+38)")
    assert not (tmp_path / "c.npy").exists()


def test_repeated_points_train_quietly(cli, tmp_path):
    """Each point three times: the neighbour graph meets edges of length 0, which it once
    divided by a float32 zero (a RuntimeWarning, hidden unless ``--debug``)."""
    np.save(tmp_path / "dup.npy", np.repeat(CIRCLE, 3, axis=0))
    args = ("train", "--data", tmp_path / "dup.npy", "--experts", "2", "--epochs", "1",
            "--threads", "1")
    for extra, out in (((), "quiet"), (("--debug",), "loud")):
        res = cli(*args, *extra, "--out", tmp_path / out)
        assert res.returncode == 0 and res.stderr == "", res


def test_warnings_hidden_unless_debug(monkeypatch, tmp_path):
    """A library's warning is noise on a command line whose errors are one line each;
    ``--debug`` lets it through."""
    import warnings

    import moeae.cli

    def noisy(args):
        warnings.warn("invalid value encountered in divide", RuntimeWarning, stacklevel=2)
        return 0

    monkeypatch.setattr(moeae.cli, "_run", noisy)
    args = ["train", "--data", "circle", "--out", str(tmp_path / "run")]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert moeae.cli.main(args) == 0
    assert seen == []
    with pytest.warns(RuntimeWarning, match="invalid value encountered in divide"):
        assert moeae.cli.main([*args, "--debug"]) == 0


@pytest.mark.parametrize("case", ["identical", "latent"])
def test_auto_checks_the_data_before_choosing_charts(cli, tmp_path, case):
    """``--experts auto`` chose charts first: identical points raised ARPACK's "Starting
    vector is zero" with a traceback, and one feature was refused only after the choice."""
    X, message = {"identical": (np.ones((500, 3)), "same.npy: all 500 points are identical"),
                  "latent": (RNG.normal(size=(300, 1)), "latent_dim (1) must be smaller than "
                                                        "the number of features")}[case]
    np.save(tmp_path / "same.npy", X)
    res = cli("train", "--data", tmp_path / "same.npy", "--experts", "auto", "--threads", "1",
              "--out", tmp_path / "run")
    assert_error(res, message)
    assert "--experts auto:" not in res.stdout and not (tmp_path / "run").exists()


def test_auto_estimator_checks_the_data_before_choosing_charts():
    from moeae import MoEAutoencoder

    with pytest.raises(DataError, match=r"^X: all 500 points are identical"):
        MoEAutoencoder(n_experts="auto").fit(np.ones((500, 3)))


def test_check_trainable_library():
    check_trainable(CIRCLE, "X", n_charts=8)  # good data passes
    check_trainable(np.array([[0.0, 0.0], [-0.0, 1.0]]), "X", n_charts=2)
    with pytest.raises(DataError, match=r"^X: fewer distinct points \(2\) than charts \(3\)"):
        check_trainable(np.array([[0.0, 1.0], [-0.0, 1.0], [1.0, 1.0]]), "X", n_charts=3)
    # counted in chunks: the distinct rows need not be in the first one
    X = np.zeros((10_000, 2))
    X[-1] = 1.0
    check_trainable(X, "X", n_charts=2)
    with pytest.raises(DataError, match="X: all 9999 points are identical"):
        check_trainable(X[:-1], "X")
    assert check_data(np.array([[3e38, 1.0]]), "X").shape == (1, 2)  # float32 holds it
