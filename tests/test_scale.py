"""Scale: a budget bounded by the working set, memory-mapped data, streaming codes, neighbours
at any size, and the CUDA paths (skipped without a GPU)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from test_checkpoints import CKPT, KILL_AT_CHECKPOINT_WRITE, assert_same_tensors, stale_tmp

from moeae import MoEAutoencoder
from moeae import datasets as ds
from moeae.checkpoint import load_checkpoint
from moeae.data import DataError, load_array, open_npy
from moeae.neighbors import have_faiss, kneighbors

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def curve_in(dim: int, n: int, seed: int = 0, noise: float = 0.01) -> np.ndarray:
    X, _ = ds.make_circle(n, random_state=seed)
    Y = ds.embed(X, dim, random_state=0)
    return Y + noise * np.random.default_rng(seed).standard_normal(Y.shape)


def fvu(X, X_hat) -> float:
    return float(((X - X_hat) ** 2).sum(1).mean() / ((X - X.mean(0)) ** 2).sum(1).mean())


# -- the budget ---------------------------------------------------------------------------------
def test_budget_does_not_grow_with_the_data():
    """Ten times the points, the same optimizer steps: epochs x ceil(working_set / batch)."""
    from moeae.config import recipe
    from moeae.model import MoEAE
    from moeae.training import Trainer

    for n in (600, 6000):
        mc, tc = recipe("best", n_features=3, n_experts=2, epochs=3, working_set=400)
        tr = Trainer(MoEAE(mc), tc, [0])
        tr.initialize(curve_in(3, n))
        tr.fit(curve_in(3, n), 3)
        assert tr.state.step == 3 * math.ceil(400 / 64) == tr.planned_steps(n, 3)
        assert tr.planned_steps(10**7, 100) == 100 * math.ceil(400 / 64)


def test_large_data_fit_is_reproducible_and_learns():
    """A fresh working set each epoch still gives the same numbers for the same seed, and
    the curve is learnt from samples of it (hard FVU on a clean, evenly spaced test curve)."""
    X = curve_in(5, 5000)
    kw = dict(n_experts=2, epochs=30, working_set=500, n_init=1, random_state=4)
    a = MoEAutoencoder(**kw).fit(X)
    b = MoEAutoencoder(**kw).fit(X)
    np.testing.assert_array_equal(a.transform(X[:300]), b.transform(X[:300]))
    G, _ = ds.make_circle(500, grid=True)
    test = ds.embed(G, 5, random_state=0)
    assert fvu(test, a.inverse_transform(a.transform(test))) < 2e-3


def test_memmap_gives_the_same_model_as_memory(tmp_path):
    """A .npy path, an np.memmap and the array in memory train the same model."""
    X = curve_in(4, 3000, seed=1)
    path = tmp_path / "X.npy"
    np.save(path, X)
    kw = dict(n_experts=2, epochs=4, working_set=700, random_state=0)  # two starts
    ref = MoEAutoencoder(**kw).fit(X)
    probe = X[::7]
    for source in (str(path), np.load(path, mmap_mode="r")):
        est = MoEAutoencoder(**kw).fit(source)
        assert est.n_features_in_ == 4
        for a, b in zip(est.model_.state_dict().values(), ref.model_.state_dict().values()):
            assert torch.equal(a, b)
        np.testing.assert_array_equal(est.transform(probe), ref.transform(probe))
    np.testing.assert_array_equal(ref.transform(str(path)), ref.transform(X))


def test_memmap_input_errors_name_the_file(tmp_path):
    X = curve_in(3, 200)
    X[150, 2] = np.nan
    path = tmp_path / "nan.npy"
    np.save(path, X)
    with pytest.raises(DataError, match=r"nan\.npy: NaN at row 150, column 2"):
        MoEAutoencoder(epochs=1).fit(str(path))
    with pytest.raises(DataError, match=r"nan\.npy: NaN at row 150, column 2"):
        MoEAutoencoder(epochs=1).fit(np.load(path, mmap_mode="r"))
    est = MoEAutoencoder(n_experts=2, epochs=1, n_init=1, random_state=0).fit(X[:100])
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="X has 4 features, but MoEAutoencoder is expecting 3"):
        est.transform(str(wide))


def test_big_csv_is_refused_with_a_note_to_convert(tmp_path, monkeypatch):
    import moeae.data

    path = tmp_path / "big.csv"
    np.savetxt(path, np.ones((100, 3)), delimiter=",")
    monkeypatch.setattr(moeae.data, "CSV_MAX_BYTES", 1000)
    with pytest.raises(DataError, match=r"big\.csv: .* MiB of CSV is too large to parse; "
                                         r"convert it once to \.npy"):
        load_array(path)


# -- the command line on a memory-mapped file ---------------------------------------------------
def test_cli_trains_from_a_mapped_file_without_copying_it(cli, tmp_path):
    X = curve_in(6, 4000, seed=2).astype(np.float32)
    path = tmp_path / "X.npy"
    np.save(path, X)
    run = tmp_path / "run"
    res = cli("train", "--data", path, "--experts", "2", "--epochs", "3", "--working-set", "500",
              "--out", run)
    assert res.returncode == 0, res
    steps = 3 * math.ceil(500 / 64)
    assert f"3 epochs, {steps} steps" in res.stdout
    data = np.load(run / "data.npz")
    assert "X_train" not in data.files and data["X_eval"].shape == (2000, 6)
    assert (run / "data.npz").stat().st_size < 0.6 * path.stat().st_size
    # the run reads the file again to resume, and notices when it changed
    assert cli("train", "--resume", run, "--epochs", "4").returncode == 0
    np.save(path, X[:-1])
    res = cli("train", "--resume", run, "--epochs", "5")
    assert res.returncode == 1 and "differs from the (4000, 6) this run was trained on" \
        in res.stderr, res


def test_cli_streams_codes_of_a_large_file(cli, tmp_path, tiny_run_dir):
    """encode/decode go through the file in chunks (more rows than one chunk here) and
    give what the model gives on the whole array."""
    from moeae.data import SCAN_ROWS
    from moeae.run import decode, encode, load_model

    n = SCAN_ROWS + 1234
    X = np.random.default_rng(0).normal(size=(n, 2))
    np.save(tmp_path / "X.npy", X)
    assert cli("encode", tiny_run_dir, tmp_path / "X.npy", tmp_path / "Z.npy").returncode == 0
    assert cli("decode", tiny_run_dir, tmp_path / "Z.npy", tmp_path / "Y.csv").returncode == 0
    model, _ = load_model(tiny_run_dir)
    Z = np.load(tmp_path / "Z.npy")
    np.testing.assert_array_equal(Z, encode(model, X))
    Y = np.loadtxt(tmp_path / "Y.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(Y, decode(model, Z), rtol=1e-8, atol=1e-12)  # %.9g text
    bad = Z.copy()
    bad[SCAN_ROWS + 5, 0] = 7
    np.save(tmp_path / "bad.npy", bad)
    res = cli("decode", tiny_run_dir, tmp_path / "bad.npy", tmp_path / "Y.csv")
    assert res.returncode == 1 and f"row {SCAN_ROWS + 5} is out of range" in res.stderr, res
    assert np.loadtxt(tmp_path / "Y.csv", delimiter=",", skiprows=1).shape == (n, 2)  # intact


def test_killed_then_resumed_on_mapped_data_is_bit_identical(cli, tmp_path):
    """Default recipe on data larger than its working set (atlas sample, warm start, then a
    fresh working set and its neighbours each epoch): killed while writing the epoch-3
    checkpoint, the resume finishes exactly as an uninterrupted run."""
    path = tmp_path / "X.npy"
    np.save(path, curve_in(3, 1500, seed=5))
    a, b = tmp_path / "A", tmp_path / "B"
    args = ("train", "--data", str(path), "--experts", "2", "--seed", "3", "--epochs", "5",
            "--working-set", "300", "--threads", "1")
    # the warm start is 20 epochs of the recipe: shorten it so relabelled epochs are reached
    script = KILL_AT_CHECKPOINT_WRITE.replace(
        "from moeae.cli import main",
        "import moeae.config as c\n"
        "_best = c.RECIPES['best']\n"
        "def best():\n"
        "    m, t = _best(); t.warm_start_epochs = 2; return m, t\n"
        "c.RECIPES['best'] = best\n"
        "from moeae.cli import main")
    p = subprocess.run([sys.executable, "-c", script, *args, "--out", str(a)],
                       env={**os.environ, "KILL_AT_WRITE": "5"}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert load_checkpoint(a / CKPT)["meta"]["state"]["epoch"] == 3
    resume = script.replace('int(os.environ["KILL_AT_WRITE"])', "-1")
    p = subprocess.run([sys.executable, "-c", resume, "train", "--resume", str(a)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "5 epochs" in p.stdout, p.stderr
    assert stale_tmp(a) == []
    p = subprocess.run([sys.executable, "-c", resume, *args, "--out", str(b)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    for prefix in ("model.", "optim.", "rng.", "extra."):
        assert_same_tensors(a, b, prefix)
    assert (a / "metrics.json").read_text() == (b / "metrics.json").read_text()


MEMORY_PROBE = textwrap.dedent("""
    import resource, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from moeae import MoEAutoencoder
    import moeae.estimator, moeae.atlas, sklearn.cluster, sklearn.neighbors  # imports first
    import scipy.sparse.csgraph, scipy.linalg
    X = np.load(sys.argv[1], mmap_mode="r")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    est = MoEAutoencoder(n_experts=2, epochs=2, working_set=300, n_init=1, random_state=0)
    est.fit(X)
    codes = est.transform(X[:1000])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((peak - base) // 1024)
""")


def test_mapped_file_trains_in_bounded_memory(tmp_path):
    """A 400 MB file is checked, sampled and trained on without its pages accumulating in
    the process's resident memory."""
    path = tmp_path / "big.npy"
    n, d = 1_600_000, 64
    out = np.lib.format.open_memmap(path, "w+", np.float32, (n, d))
    rng = np.random.default_rng(0)
    for i in range(0, n, 200_000):
        out[i:i + 200_000] = rng.standard_normal((200_000, d), dtype=np.float32) * 0.01
    out.flush()
    del out
    assert path.stat().st_size > 400e6
    p = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path)], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    grew_mb = int(p.stdout.split()[-1])
    assert grew_mb < 150, f"resident memory grew by {grew_mb} MB while training on the map"


# -- neighbours -------------------------------------------------------------------------------
def _recall(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a, b)]))


def test_torch_neighbours_equal_exact():
    X = curve_in(8, 1500)
    d0, i0 = kneighbors(X, 6, method="exact")
    d1, i1 = kneighbors(torch.as_tensor(X), 6, method="torch")
    assert _recall(i1, i0) == 1.0
    np.testing.assert_allclose(d1, d0, atol=1e-6)
    assert (i1[:, 0] == np.arange(len(X))).all()  # each point first among its own neighbours


@pytest.mark.skipif(not have_faiss(), reason="faiss not installed (moeae[scale])")
def test_approximate_neighbours_agree_with_exact():
    """HNSW on 30,000 points of a noisy curve and a swiss roll in 32-D: recall >= 0.95."""
    S, _ = ds.make_swiss_roll(30_000, random_state=0)
    for X in (curve_in(32, 30_000), ds.embed(S, 32, random_state=0)):
        _, exact = kneighbors(X, 10, method="exact")
        _, approx = kneighbors(X, 10)  # auto: HNSW above EXACT_MAX points
        assert _recall(approx[:, 1:], exact[:, 1:]) >= 0.95


def test_neighbour_errors():
    with pytest.raises(ValueError, match=r"n_neighbors must be in 1\.\.5 .* got 6"):
        kneighbors(np.zeros((5, 2)), 6)
    with pytest.raises(ValueError, match="method must be 'auto', 'exact', 'hnsw' or 'torch'"):
        kneighbors(np.zeros((5, 2)), 2, method="ball")


def test_open_npy_checks_in_chunks(tmp_path, monkeypatch):
    import moeae.data

    monkeypatch.setattr(moeae.data, "SCAN_ROWS", 64)
    X = np.ones((1000, 2))
    X[777, 1] = np.inf
    np.save(tmp_path / "x.npy", X)
    with pytest.raises(DataError, match=r"x\.npy: inf at row 777, column 1$"):
        open_npy(tmp_path / "x.npy")
    assert isinstance(open_npy(tmp_path / "x.npy", scan=False), np.memmap)


# -- CUDA ----------------------------------------------------------------------------------------
@cuda
def test_cuda_fit_transform_inverse_transform():
    X = curve_in(5, 3000)
    kw = dict(n_experts=2, epochs=20, working_set=1000, n_init=1, random_state=0)
    gpu = MoEAutoencoder(device="cuda", **kw).fit(X)
    assert gpu.model_.shift.device.type == "cuda"
    Z = gpu.transform(X)
    assert fvu(X, gpu.inverse_transform(Z)) < 1e-2
    cpu = MoEAutoencoder(device="cpu", **kw).fit(X)
    assert abs(fvu(X, cpu.inverse_transform(cpu.transform(X))) -
               fvu(X, gpu.inverse_transform(Z))) < 1e-2


@cuda
def test_cuda_neighbours_equal_exact():
    X = curve_in(8, 3000)
    _, exact = kneighbors(X, 8, method="exact")
    _, gpu = kneighbors(torch.as_tensor(X, device="cuda"), 8)
    assert _recall(gpu, exact) == 1.0


@cuda
def test_cuda_cli_train_encode_decode(cli, tmp_path):
    np.save(tmp_path / "X.npy", curve_in(4, 3000))
    run = tmp_path / "run"
    assert cli("train", "--data", tmp_path / "X.npy", "--experts", "2", "--epochs", "3",
               "--device", "cuda", "--out", run).returncode == 0
    for cmd, src, dst in (("encode", "X.npy", "Z.npy"), ("decode", "Z.npy", "Y.npy")):
        res = cli(cmd, run, tmp_path / src, tmp_path / dst, "--device", "cuda")
        assert res.returncode == 0, res
    assert np.load(tmp_path / "Y.npy").shape == (3000, 4)


def test_rows_of_a_map_and_its_views_read_from_the_file(tmp_path):
    """Rows are read from the file at the right place for a map, a row-sliced view (whose
    ``offset`` attribute is its parent's) and a column-sliced view (read through the map)."""
    from moeae.working_set import _file_rows, read_rows

    X = np.arange(5000 * 3, dtype=np.float64).reshape(5000, 3)
    np.save(tmp_path / "x.npy", X)
    M = np.load(tmp_path / "x.npy", mmap_mode="r")
    idx = np.array([0, 1, 17, 2500, 4999 - 1000])
    for view, ref in ((M, X), (M[1000:], X[1000:]), (M[:, 1:], X[:, 1:])):
        np.testing.assert_array_equal(read_rows(view, idx), ref[idx].astype(np.float32))
    assert _file_rows(M[1000:]) is not None and _file_rows(M[:, 1:]) is None
    assert _file_rows(X) is None
