"""Library-level input errors: ``check_data``, ``load_array``, the estimator, ``run.decode``.
Each raises a ValueError (DataError) or TypeError whose message names the problem."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import MarkerPickle, planted_pickle

from moeae import MoEAutoencoder
from moeae.config import ModelConfig
from moeae.data import DataError, check_data, load_array
from moeae.model import MoEAE
from moeae.run import decode, encode

GOOD = np.random.default_rng(0).normal(size=(40, 2))


# -- check_data --------------------------------------------------------------------------------
def _with(value):
    X = GOOD.copy().astype(np.result_type(GOOD, value))
    X[3, 1] = value
    return X


@pytest.mark.parametrize("X, fragments", [
    (_with(np.nan), ("X:", "NaN", "row 3, column 1")),
    (_with(np.inf), ("X:", "inf", "row 3, column 1")),
    (_with(-np.inf), ("X:", "inf", "row 3, column 1")),
    (GOOD.astype(complex), ("complex",)),
    (np.array([[1.0, "a"]], dtype=object), ("object",)),
    (np.array([["1", "2"]]), ("not numeric",)),
    (np.arange(4.0), ("2-D", "1-D", "(4,)")),
    (np.ones((2, 2, 2)), ("2-D", "(2, 2, 2)")),
    (np.empty((0, 2)), ("empty", "(0, 2)")),
    (np.empty((3, 0)), ("empty", "(3, 0)")),
])
def test_check_data_rejects(X, fragments):
    with pytest.raises(DataError) as info:
        check_data(X, "X")
    for f in fragments:
        assert f in str(info.value)
    assert isinstance(info.value, ValueError)


def test_check_data_widths_and_samples():
    with pytest.raises(DataError, match=r"has 2 features .* expects 3"):
        check_data(GOOD, "X", n_features=3)
    with pytest.raises(DataError, match="need >= 2 samples"):
        check_data(GOOD[:1], "X", min_samples=2)
    out = check_data(GOOD.astype(np.float32).tolist(), "X", n_features=2, min_samples=2)
    assert out.dtype == np.float64 and out.shape == (40, 2)
    assert check_data(np.ones((3, 2), dtype=bool)).dtype == np.float64


# -- load_array --------------------------------------------------------------------------------
def test_load_array_rejects_every_bad_file(bad_inputs):
    for name, (path, fragments) in bad_inputs.items():
        with pytest.raises(DataError) as info:
            load_array(path)
        msg = str(info.value)
        assert str(path) in msg and all(f in msg for f in fragments), (name, msg)


def test_load_array_csv_header_optional(tmp_path):
    X = np.round(GOOD[:6], 6)
    rows = "\n".join(",".join(repr(float(v)) for v in r) for r in X)
    cases = {"plain.csv": rows, "header.csv": "a,b\n" + rows,
             "blank_lines.csv": "\n\na,b\n\n" + rows.replace("\n", "\n\n") + "\n\n",
             "crlf.csv": ("a,b\n" + rows).replace("\n", "\r\n"), "upper.CSV": rows}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        np.testing.assert_array_equal(load_array(tmp_path / name), X, err_msg=name)


def test_load_array_csv_line_numbers_count_blank_lines(tmp_path):
    (tmp_path / "x.csv").write_text("x,y\n\n1,2\n\n3,oops\n")
    with pytest.raises(DataError, match=r"line 5: non-numeric value 'oops'"):
        load_array(tmp_path / "x.csv")
    (tmp_path / "r.csv").write_text("1,2\n\n3\n")
    with pytest.raises(DataError, match=r"ragged rows: line 3 has 1 values, expected 2"):
        load_array(tmp_path / "r.csv")


def test_load_array_first_row_typo_is_not_a_header(tmp_path):
    """A first data row with one bad cell is reported, not silently dropped as a header."""
    (tmp_path / "x.csv").write_text("1.0,2.o\n3,4\n5,6\n")
    with pytest.raises(DataError, match=r"line 1: non-numeric value '2.o'"):
        load_array(tmp_path / "x.csv")


def test_load_array_width_and_min_samples(tmp_path):
    np.save(tmp_path / "x.npy", GOOD)
    with pytest.raises(DataError, match=r"x.npy: has 2 features .* expects 5"):
        load_array(tmp_path / "x.npy", n_features=5)
    np.save(tmp_path / "one.npy", GOOD[:1])
    with pytest.raises(DataError, match="one.npy: empty data"):
        load_array(tmp_path / "one.npy", min_samples=2)


def test_load_array_refuses_pickles_without_running_them(tmp_path):
    marker = tmp_path / "MARKER"
    (tmp_path / "raw.npy").write_bytes(planted_pickle(marker))
    obj = np.empty((1, 2), dtype=object)
    obj[0, 0] = obj[0, 1] = MarkerPickle(marker)
    np.save(tmp_path / "obj.npy", obj, allow_pickle=True)
    np.savez(tmp_path / "zip.npy", X=GOOD)  # an .npz under a .npy name
    (tmp_path / "zip.npy.npz").rename(tmp_path / "zip.npy")
    for name, fragment in [("raw.npy", "not a .npy file"), ("obj.npy", "pickle"),
                           ("zip.npy", "not a .npy file")]:
        with pytest.raises(DataError, match=fragment):
            load_array(tmp_path / name)
    assert not marker.exists()


def test_load_array_truncated_npy(tmp_path):
    np.save(tmp_path / "x.npy", GOOD)
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "x.npy").write_bytes(data[: len(data) - 50])
    with pytest.raises(DataError, match="x.npy: not a valid .npy file"):
        load_array(tmp_path / "x.npy")


# -- the estimator -----------------------------------------------------------------------------
def _est(**kw):
    return MoEAutoencoder(**{"n_experts": 2, "recipe": "seed", "epochs": 1, "random_state": 0,
                             "device": "cpu", **kw})


@pytest.fixture(scope="module")
def fitted():
    return _est().fit(GOOD)


@pytest.mark.parametrize("X, error, pattern", [
    (_with(np.nan), ValueError, "NaN"),
    (_with(np.inf), ValueError, "infinity"),
    (np.arange(5.0), ValueError, "1D"),
    (np.empty((0, 2)), ValueError, "0 sample"),
    (GOOD[:1], ValueError, "1 sample"),
    (np.empty((5, 0)), ValueError, "0 feature"),
    (GOOD.astype(complex), ValueError, "[Cc]omplex"),
    (np.array([[1.0, "a"], [2.0, "b"]], dtype=object), ValueError, "'a'"),
    (np.array([[{}, {}], [{}, {}]], dtype=object), TypeError, "dict"),
])
def test_fit_rejects_bad_input(X, error, pattern):
    with pytest.raises(error, match=pattern):
        _est().fit(X)


@pytest.mark.parametrize("kw, pattern", [
    ({"latent_dim": 2},
     r"latent_dim \(2\) must be smaller than the number of features \(n_features = 2\)"),
    ({"latent_dim": 5}, r"latent_dim \(5\) .* features \(n_features = 2\)"),
    ({"latent_dim": 0}, r"latent_dim must be >= 1, got 0"),
    ({"n_experts": 0}, r"n_experts must be >= 1, got 0"),
    ({"n_experts": -3}, r"n_experts must be >= 1, got -3"),
    ({"epochs": -1}, r"epochs must be >= 0, got -1"),
    ({"lr": 0.0}, r"lr must be > 0"),
    ({"recipe": "fast"}, r"unknown recipe 'fast'"),
])
def test_fit_rejects_bad_settings(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        _est(**kw).fit(GOOD)


def test_fit_rejects_non_int_settings():
    with pytest.raises(TypeError, match="n_experts must be an int"):
        _est(n_experts=2.5).fit(GOOD)


def test_transform_wrong_width(fitted):
    with pytest.raises(ValueError, match=r"X has 3 features.*expecting 2"):
        fitted.transform(np.ones((4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        fitted.transform(_with(np.nan))


def test_inverse_transform_bad_codes(fitted):
    codes = fitted.transform(GOOD[:5])
    assert fitted.inverse_transform(codes).shape == (5, 2)
    bad = codes.copy()
    bad[2, 0] = 7
    with pytest.raises(ValueError, match=r"chart index 7 in row 2 is out of range.*0\.\.1"):
        fitted.inverse_transform(bad)
    bad[2, 0] = 0.5
    with pytest.raises(ValueError, match=r"^chart index 0\.5 in row 2 is not a whole number: "
                                         r"the model has charts 0\.\.1$"):
        fitted.inverse_transform(bad)
    with pytest.raises(ValueError, match=r"\(n, 2\).*\(5, 3\)"):
        fitted.inverse_transform(np.zeros((5, 3)))
    codes[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fitted.inverse_transform(codes)


# -- run.decode --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MoEAE(ModelConfig(n_features=2, latent_dim=1, n_experts=3)).eval()


@pytest.mark.parametrize("chart, shown", [(3, "3"), (-1, "-1"), (1.5, "1.5"), (1e9, "1e+09")])
def test_decode_chart_out_of_range(model, chart, shown):
    codes = np.array([[0, 0.1], [2, 0.2], [chart, 0.3]])
    pattern = rf"chart index {re.escape(shown)} in row 2 .* charts 0\.\.2"
    with pytest.raises(ValueError, match=pattern):
        decode(model, codes)


def test_decode_shape_and_round_trip(model):
    with pytest.raises(ValueError, match=r"\(n, 2\).*\(4,\)"):
        decode(model, np.zeros(4))
    codes = encode(model, GOOD[:8])
    assert codes.shape == (8, 2) and set(codes[:, 0]) <= {0.0, 1.0, 2.0}
    assert decode(model, codes).shape == (8, 2)


def test_fit_refuses_data_with_nothing_to_learn(tmp_path):
    """The estimator checks what ``moeae train`` checks, for arrays and memory-mapped files."""
    same = np.ones((200, 3))
    with pytest.raises(DataError, match=r"^X: all 200 points are identical"):
        MoEAutoencoder(epochs=1).fit(same)
    np.save(tmp_path / "same.npy", same)
    with pytest.raises(DataError, match=r"same\.npy: all 200 points are identical"):
        MoEAutoencoder(epochs=1).fit(str(tmp_path / "same.npy"))
    three = np.repeat(np.eye(3), 10, axis=0)
    with pytest.raises(DataError, match=r"fewer distinct points \(3\) than charts \(4\)"):
        MoEAutoencoder(n_experts=4, epochs=1).fit(three)
