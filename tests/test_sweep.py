"""``moeae sweep``: settings x seeds as populations, their tables and run folders, resume,
and the same numbers in one process or on two torchrun ranks."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import moeae
from moeae.cli import _load_data, main
from moeae.config import recipe
from moeae.distributed import Context, DistributedError
from moeae.model import MoEAE
from moeae.run import RunError, load_model, resume_run, train_run
from moeae.sweep import _deal, _everywhere, _plan, _Source, summarize
from moeae.training import DivergenceError, Trainer, member_state

TINY = dict(seeds=3, recipe="seed", epochs=2, n_samples=100, population=2, device="cpu")
TINY_ARGS = ["--data", "circle", "--experts", "1", "2", "--seeds", "3", "--recipe", "seed",
             "--epochs", "2", "--n-samples", "100", "--population", "2", "--threads", "1",
             "--device", "cpu"]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """circle, 1 and 2 experts x seeds 0-2, populations of 2 (read-only: copy to change)."""
    torch.set_num_threads(1)  # module-scoped: set up before the autouse one-thread fixture
    out = tmp_path_factory.mktemp("sweep") / "sw"
    res = moeae.sweep("circle", [1, 2], out=out, **TINY)
    return out, res


def test_tables_list_every_model_and_summarise_each_setting(tiny_sweep):
    out, res = tiny_sweep
    models = _rows(out / "models.csv")
    assert [r["model"] for r in models] == [f"e{E}-s{s}" for E in (1, 2) for s in range(3)]
    # seeds cut into populations of 2, one setting each: [0, 1], [2] per expert count
    assert [int(r["population"]) for r in models] == [0, 0, 1, 2, 2, 3]
    assert {"fvu_hard", "fvu_soft", "train_loss", "experts_used"} <= set(models[0])
    assert res.trained == [r["model"] for r in models]
    summary = _rows(out / "summary.csv")
    assert [(int(r["n_experts"]), int(r["n_seeds"])) for r in summary] == [(1, 3), (2, 3)]
    for row in res.summary:  # against an independent computation from the models table
        mine = [r for r in res.models if r["n_experts"] == row["n_experts"]]
        fvu = np.array([r["fvu_hard"] for r in mine])
        assert row["fvu_hard"] == pytest.approx(fvu.mean())
        assert row["fvu_hard_sd"] == pytest.approx(fvu.std(ddof=1))
        assert row["best_seed"] == mine[int(fvu.argmin())]["seed"]
        assert row["worst_fvu_hard"] == fvu.max()
        assert row["success_share"] == np.mean(fvu <= 1e-4)
    loose = summarize(res.models, success_fvu=0.99)
    assert loose[1]["success_share"] == np.mean([r["fvu_hard"] <= 0.99 for r in res.models[3:]])


def test_each_model_has_a_complete_run_folder(tiny_sweep):
    out, res = tiny_sweep
    for r in res.models:
        run = out / "runs" / r["model"]
        config = json.loads((run / "config.json").read_text())
        assert config["model"]["n_experts"] == r["n_experts"]
        assert config["train"]["seed"] == r["seed"]
        assert config["data"]["random_state"] == r["seed"]  # its own sample, as train --seed
        assert r["model"] in config["population"]
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics == [{k: r[k] for k in metrics[0]}]
        assert (run / "snapshots" / "epoch_0002.npz").is_file()
        assert moeae.run.evaluate_run(run)["fvu_hard"] == pytest.approx(r["fvu_hard"], rel=1e-3)


def test_a_sweep_model_resumes_and_encodes(tiny_sweep, tmp_path, capsys):
    run = tmp_path / "e2-s1"
    shutil.copytree(tiny_sweep[0] / "runs" / "e2-s1", run)
    assert main(["train", "--resume", str(run), "--epochs", "3", "--threads", "1"]) == 0
    assert [r["epoch"] for r in json.loads((run / "metrics.json").read_text())] == [2, 3]
    np.save(tmp_path / "x.npy", moeae.datasets.make_circle(50, random_state=9)[0])
    assert main(["encode", str(run), str(tmp_path / "x.npy"), str(tmp_path / "z.npy")]) == 0
    assert main(["decode", str(run), str(tmp_path / "z.npy"), str(tmp_path / "y.npy")]) == 0
    assert np.load(tmp_path / "y.npy").shape == (50, 2)
    assert "resumed" in capsys.readouterr().out


def test_a_model_cut_from_its_population_continues_as_in_it(tiny_sweep, tmp_path):
    """The folder's checkpoint is the population's state of that model (weights, Adam moments,
    RNG streams), so resuming it alone follows the population's own next epoch."""
    out, _ = tiny_sweep
    source = _Source("circle", 100, 0.0, 0)
    mc, tc = recipe("seed", latent_dim=1, epochs=2, device="cpu")
    X = torch.as_tensor(np.stack([source.for_seed(s).X for s in (0, 1)]))
    ref = Trainer(MoEAE(mc, [2, 2]), tc, [0, 1])
    ref.initialize(X)
    ref.fit(X, 2)
    saved = moeae.checkpoint.load_checkpoint(out / "runs" / "e2-s1" / "checkpoint.safetensors")
    mine = member_state(ref, 1)
    for key, t in mine["model"].items():
        assert torch.equal(saved["model"][key], t), key
    for i, st in mine["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved["optimizer"]["state"][i][key], st[key]), (i, key)
    for key in ("shuffle.0", "dropout.0"):
        assert torch.equal(saved["rng"][key], mine["rng"][key])
    ref.fit(X, 3)  # one more epoch in the population (constant learning rate) ...
    run = tmp_path / "run"
    shutil.copytree(out / "runs" / "e2-s1", run)
    resume_run(run, epochs=3)  # ... and alone, from the folder
    alone = load_model(run)[0].state_dict()
    both = ref.model.select(1).double().state_dict()
    before = {k: v.double() for k, v in saved["model"].items()}
    for key, a in alone.items():  # the matmul paths of 1 and 2 models round apart a little
        assert torch.allclose(a, both[key], rtol=1e-4, atol=1e-6), key
    weights = [k for k in both if both[k].is_floating_point()]
    step = max(float((both[k] - before[k]).abs().max()) for k in weights)
    gap = max(float((alone[k] - both[k]).abs().max()) for k in weights)
    assert gap < step / 100, (gap, step)  # far closer than the epoch moved the weights


def test_a_population_of_one_is_the_model_train_makes(tmp_path):
    """The sweep measures what ``moeae train --seed s`` measures, on the same data."""
    res = moeae.sweep("circle", 2, seed=4, out=tmp_path / "sw",
                      **(TINY | dict(seeds=1, population=1)))
    X, X_te, t_te, closed, info = _load_data("circle", 100, 0.0, 4)
    mc, tc = recipe("seed", n_experts=2, latent_dim=1, epochs=2, seed=4, device="cpu")
    train_run(tmp_path / "one", X, mc, tc, X_test=X_te, t_test=t_te, closed=closed,
              data_info=info)
    row = json.loads((tmp_path / "one" / "metrics.json").read_text())[-1]
    assert res.models[0] == {"model": "e2-s4", "n_experts": 2, "latent_dim": 1, "seed": 4,
                             "population": 0, **row}
    a, b = (moeae.checkpoint.load_checkpoint(p / "checkpoint.safetensors")
            for p in (tmp_path / "one", tmp_path / "sw" / "runs" / "e2-s4"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_killed_sweep_resumes_with_the_same_tables(tiny_sweep, tmp_path):
    out = tmp_path / "sw"
    shutil.copytree(tiny_sweep[0], out)
    before = {f: (out / f).read_bytes() for f in ("models.csv", "summary.csv")}
    (out / "models.csv").unlink()
    (out / "summary.csv").unlink()
    (out / "runs" / "e2-s1" / "metrics.json").unlink()  # killed while writing this folder
    shutil.rmtree(out / "runs" / "e1-s2")  # ... and before this one
    kept = (out / "runs" / "e2-s0" / "checkpoint.safetensors").stat().st_mtime_ns
    res = moeae.sweep("circle", [1, 2], out=out, **TINY)
    # population [e2-s0, e2-s1] trained again from scratch, only the missing folder written
    assert res.trained == ["e1-s2", "e2-s1"]
    assert (out / "runs" / "e2-s0" / "checkpoint.safetensors").stat().st_mtime_ns == kept
    for f, data in before.items():
        assert (out / f).read_bytes() == data, f
    again = moeae.sweep("circle", [1, 2], out=out, **TINY)  # complete: nothing to train
    assert again.trained == [] and (out / "models.csv").read_bytes() == before["models.csv"]


def test_another_sweep_in_the_same_folder_is_refused_unless_forced(tiny_sweep, tmp_path,
                                                                   capsys):
    out = tmp_path / "sw"
    shutil.copytree(tiny_sweep[0], out)
    (out / "notes.txt").write_text("mine")
    args = ["sweep"] + TINY_ARGS + ["--out", str(out)]
    args[args.index("--experts") + 2] = "4"  # --experts 1 4
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "differs in experts" in err and "--force" in err
    assert len(err.splitlines()) == 1
    assert main(args + ["--force"]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        f"e{E}-s{s}" for E in (1, 4) for s in range(3)]
    assert (out / "notes.txt").read_text() == "mine"  # only the sweep's own files go
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("")
    with pytest.raises(RunError, match="holds no readable sweep.json"):
        moeae.sweep("circle", [1], out=other, **TINY)


def test_populations_are_fixed_by_the_sweep_and_dealt_by_cost():
    plan = _plan([2, 4], list(range(10)), 4)
    assert [[m.name for m in p] for p in plan][:3] == [
        ["e2-s0", "e2-s1", "e2-s2", "e2-s3"], ["e2-s4", "e2-s5", "e2-s6", "e2-s7"],
        ["e2-s8", "e2-s9"]]
    costs = [len(p) * (1 + 2 * p[0].n_experts) for p in plan]  # 20, 20, 10, 36, 36, 18
    assert _deal(costs, 1) == [list(range(6))]
    assert _deal(costs, 2) == [[0, 3, 5], [1, 2, 4]]  # 74 and 66
    assert _deal(costs, 8)[6:] == [[], []]  # more ranks than populations: some idle


def test_a_named_dataset_gives_each_seed_what_train_draws():
    for name in ("figure8", "sphere"):
        mine = _Source(name, 60, 0.05, 0).for_seed(3)
        X, X_te, t_te, closed, info = _load_data(name, 60, 0.05, 3)
        assert np.array_equal(mine.X, X) and np.array_equal(mine.X_eval, X_te)
        assert (mine.t is None) == (t_te is None) and mine.closed == closed
        assert mine.info == info


def test_a_file_is_shared_by_every_seed_and_memory_mapped(tmp_path):
    X, _ = moeae.datasets.make_circle(120, random_state=5)
    np.save(tmp_path / "x.npy", X)
    res = moeae.sweep(tmp_path / "x.npy", 2, seeds=2, recipe="seed", epochs=1,
                      out=tmp_path / "sw", device="cpu")
    assert [r["model"] for r in res.models] == ["e2-s0", "e2-s1"]
    run = tmp_path / "sw" / "runs" / "e2-s1"
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["mapped"] and config["data"]["shape"] == [120, 2]
    assert set(np.load(run / "data.npz").files) == {"X_eval"}  # no copy of the file
    resume_run(run, epochs=2)
    # in Python, an array; nothing written without out
    mem = moeae.sweep(X, 2, seeds=2, recipe="seed", epochs=1, device="cpu")
    assert mem.out is None and [r["fvu_hard"] for r in mem.models] == \
        [r["fvu_hard"] for r in res.models]


@pytest.mark.parametrize("kwargs, message", [
    (dict(experts=[2, 2]), "twice"),
    (dict(experts=[0]), "experts must be"),
    (dict(experts=[]), "experts must be"),
    (dict(seeds=0), "seeds must be an integer >= 1"),
    (dict(population=0), "population must be an integer >= 1"),
    (dict(success_fvu=0.0), "success_fvu"),
    (dict(latent_dim=2), "latent_dim (2) must be smaller"),
    (dict(data="no_such_curve"), "unknown dataset 'no_such_curve'"),
    (dict(lr=-1.0), "lr must be > 0"),
    (dict(colour="red"), "unknown setting 'colour'"),
])
def test_bad_parameters_are_one_clear_error(kwargs, message):
    args = dict(data="circle", experts=[2], seeds=1, epochs=1, recipe="seed") | kwargs
    with pytest.raises((ValueError, TypeError)) as info:
        moeae.sweep(args.pop("data"), args.pop("experts"), **args)
    assert message in str(info.value)


def test_a_failure_on_one_rank_is_raised_on_every_rank():
    class Two(Context):  # rank 0 of two, whose peer's result is given
        def all_gather_object(self, obj):
            return [obj, (None, DivergenceError(3, 7, ["e4-s1"]))]

    ctx = Two(0, 2)
    with pytest.raises(DivergenceError, match=r"epoch 3, step 7 .*e4-s1"):
        _everywhere(ctx, lambda: {"e2-s0": {}})

    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("no")

    def fail():
        raise Unpicklable("lost")

    with pytest.raises(DistributedError, match="rank 0: Unpicklable: lost"):
        _everywhere(Context(), fail)


def test_import_moeae_stays_light_and_sweep_is_the_function():
    code = ("import sys, moeae, moeae.sweep\n"
            "assert callable(moeae.sweep) and moeae.sweep.__name__ == 'sweep'\n"
            "assert 'torch' not in sys.modules, 'import moeae imported torch'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _torchrun(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", MOEAE_DIST_TIMEOUT="60")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "moeae", "sweep", *args],
                          capture_output=True, text=True, env=env, timeout=300, **kw)


def test_two_ranks_give_every_model_the_numbers_of_one_process(tiny_sweep, tmp_path):
    """gloo on the CPU: populations go whole to the ranks, so nothing changes in any model."""
    one = tiny_sweep[0]
    two = tmp_path / "two"
    p = _torchrun(TINY_ARGS + ["--out", str(two)])
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("wrote") == 1 and "2 process(es)" in p.stdout  # rank 0 reports
    for f in ("models.csv", "summary.csv"):
        assert (two / f).read_bytes() == (one / f).read_bytes(), f
    for run in (one / "runs").iterdir():  # written by the rank that trained them
        for f in ("checkpoint.safetensors", "metrics.json"):
            assert (two / "runs" / run.name / f).read_bytes() == (run / f).read_bytes()


@pytest.mark.slow
def test_a_rank_that_fails_ends_the_job_with_one_error_line(tmp_path):
    p = _torchrun(TINY_ARGS + ["--lr", "1e9", "--out", str(tmp_path / "sw")])
    assert p.returncode != 0
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    # each process prints the divergence, unless the launcher stopped it first
    assert any("training diverged" in e for e in errors), p.stderr
    assert all("training diverged" in e or "stopped by the launcher" in e for e in errors)
    # torchrun adds its own report of the failed ranks; our processes print no traceback
    assert "moeae/sweep.py" not in p.stderr and "moeae/cli.py" not in p.stderr, p.stderr
