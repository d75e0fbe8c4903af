"""Several processes through torchrun (2 CPU processes, gloo): data-parallel training equals one
process on the same global batch, a dead rank ends the job with exit 1, and the run resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from test_checkpoints import CKPT, assert_same_tensors

from moeae import datasets as ds
from moeae.checkpoint import load_checkpoint
from moeae.distributed import SINGLE, init, launched

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MOEAE_DIST_TIMEOUT": "60"}

# 50+ steps of one model in float64, in one process or as one of two ranks
EQUALITY = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from moeae import datasets as ds
    from moeae.config import recipe
    from moeae.distributed import init, shutdown
    from moeae.model import MoEAE
    from moeae.training import Trainer
    ctx = init("cpu")
    X, _ = ds.make_circle(300, noise=0.01, random_state=0)
    overrides = json.loads(sys.argv[2])
    mc, tc = recipe(overrides.pop("recipe"), n_features=2, n_experts=2, batch_size=32,
                    working_set=200, **overrides)
    tr = Trainer(MoEAE(mc).double(), tc, [0], ctx=ctx)
    tr.initialize(X)
    tr.fit(X, 8)  # 8 epochs x 7 steps of 32 (the last of 8 points)
    if ctx.is_main:
        x = torch.as_tensor(X, dtype=torch.float64)[None]
        with torch.no_grad():
            outputs = tr.model.expert_outputs(x)
        torch.save({"state": tr.model.state_dict(), "history": tr.state.history,
                    "steps": tr.state.step, "outputs": outputs}, sys.argv[1])
    shutdown()
""")


@pytest.mark.parametrize("overrides", [
    # the default recipe: atlas start, warm start, then relabelled working sets
    {"recipe": "best", "warm_start_epochs": 2},
    # per-batch responsibility targets (a batch statistic) and the load-balancing loss
    {"recipe": "best", "warm_start_epochs": 0, "relabel_neighbors": 0, "chart_init": False,
     "balance_weight": 0.1},
    # the seed's soft routing with its batch-mean router loss, without dropout
    {"recipe": "seed", "dropout": 0.0, "output_dropout": False},
], ids=["best", "per-batch-targets", "soft-router-loss"])
def test_data_parallel_equals_one_process(tmp_path, overrides):
    """Two ranks, each on half of every global batch of 32, give the weights of one process
    on the whole batch within 1e-6 after 56 steps (float64, gloo), and the same
    reconstructions. The decoders' output layers, solved after training (moeae.readout), are
    judged by those: a least-squares solve near its smallest ridge strengths turns the last
    bits of its features into larger differences of weights that cancel."""
    script = tmp_path / "eq.py"
    script.write_text(EQUALITY)
    arg = json.dumps(overrides)
    one = subprocess.run([sys.executable, script, tmp_path / "one.pt", arg], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(TORCHRUN + [script, tmp_path / "two.pt", arg], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a["steps"] == b["steps"] == 56
    assert torch.equal(a["state"]["active"], b["state"]["active"])
    solved = {"decoder.layers.4.weight", "decoder.layers.4.bias"}
    worst = max(float((a["state"][k] - b["state"][k]).abs().max()) for k in a["state"]
                if a["state"][k].is_floating_point() and k not in solved)
    assert worst < 1e-6, f"weights differ by {worst:.3g}"
    worst = float((a["outputs"] - b["outputs"]).abs().max())
    assert worst < 1e-6, f"reconstructions differ by {worst:.3g}"
    np.testing.assert_allclose(a["history"], b["history"], rtol=1e-9)
    assert "Warning" not in two.stderr, two.stderr


# rank 1 kills itself (SIGKILL) as its epoch KILL_EPOCH begins
KILLER = textwrap.dedent("""
    import os, signal, sys
    import moeae.training as t
    _epoch_data = t.Trainer._epoch_data
    def epoch_data(self, data, epoch, progress):
        if self.ctx.rank == 1 and epoch == int(os.environ["KILL_EPOCH"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return _epoch_data(self, data, epoch, progress)
    t.Trainer._epoch_data = epoch_data
    from moeae.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_dead_rank_ends_the_job_then_resume_completes(tmp_path):
    path = tmp_path / "X.npy"
    np.save(path, ds.embed(ds.make_circle(1200, noise=0.01, random_state=1)[0], 4))
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    run = tmp_path / "run"
    args = ["train", "--data", str(path), "--experts", "2", "--epochs", "6", "--working-set",
            "400", "--threads", "1", "--out", str(run)]
    p = subprocess.run(TORCHRUN + [script, *args], env={**ENV, "KILL_EPOCH": "3"},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    assert "Signal 9 (SIGKILL) received" in p.stderr, p.stderr  # the launcher names the cause
    # the surviving rank says in one line why it stopped: the peer is gone, or the launcher
    # stopped it
    assert ("error: rank 0: a peer process failed" in p.stderr
            or "error: stopped by the launcher: another process of this job failed"
            in p.stderr), p.stderr
    assert "[rank0]: Traceback" not in p.stderr, p.stderr  # no traceback from our ranks
    # rank 0's last complete write: epoch 3, or 2 when the launcher stopped it while it wrote
    assert load_checkpoint(run / CKPT)["meta"]["state"]["epoch"] in (2, 3)

    p = subprocess.run(TORCHRUN + ["-m", "moeae", "train", "--resume", str(run), "--threads",
                                   "1"], env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "resumed" in p.stdout and "6 epochs" in p.stdout
    assert [r["epoch"] for r in json.loads((run / "metrics.json").read_text())] == \
        list(range(1, 7))
    # and the run folder is an ordinary one: one process continues it
    ref = tmp_path / "ref"
    p = subprocess.run(TORCHRUN + ["-m", "moeae", *args[:-1], str(ref)], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert_same_tensors(run, ref)  # killed + resumed == uninterrupted, on two ranks


def test_rank0_error_reaches_every_rank(tmp_path):
    """A non-empty --out is refused on rank 0; rank 1 does not wait for it."""
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    p = subprocess.run(TORCHRUN + ["-m", "moeae", "train", "--data", "circle", "--experts", "2",
                                   "--epochs", "1", "--threads", "1", "--out", str(out)],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert p.stderr.count("is not empty; use --force") == 2, p.stderr  # one line per rank
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_single_process_context(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert not launched() and init() is SINGLE
    assert SINGLE.all_gather_object(3) == [3] and SINGLE.is_main and not SINGLE.active
