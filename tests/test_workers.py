"""Forked workers and the split of a study into shards."""

import os
import pickle

import pytest

from moeae.study import _balance, _model_cost
from moeae.training import DivergenceError
from moeae.workers import Worker, WorkerError, can_fork, fork_map

needs_fork = pytest.mark.skipif(not can_fork(), reason="needs fork")


def _square_and_pid(x):
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x * x, os.getpid()


def _exit_hard(_):
    os._exit(7)


@needs_fork
def test_fork_map_runs_the_first_item_here_and_the_rest_in_children():
    results = fork_map(_square_and_pid, [1, 2, 4])
    assert [r for r, _ in results] == [1, 4, 16]
    pids = [p for _, p in results]
    assert pids[0] == os.getpid() and len(set(pids)) == 3


@needs_fork
def test_a_child_error_is_raised_here_with_its_type_and_message():
    with pytest.raises(ValueError, match="bad item 3"):
        fork_map(_square_and_pid, [1, 3])


@needs_fork
def test_a_dead_worker_is_an_error_that_names_it():
    with Worker() as w:
        w.submit(_exit_hard, None)
        with pytest.raises(WorkerError, match=r"worker process \d+ died \(exit code 7\)"):
            w.result()


def test_divergence_error_survives_the_trip_between_processes():
    exc = pickle.loads(pickle.dumps(DivergenceError(3, 17, [2, 5])))
    assert (exc.epoch, exc.step, exc.models) == (3, 17, [2, 5])
    assert "epoch 3, step 17 (model(s) [2, 5])" in str(exc)


def test_balance_splits_the_seed_study_evenly_and_deterministically():
    counts = [E for _ in range(3) for E in (1, 2, 4, 8)]
    costs = [_model_cost(E) for E in counts]
    groups = _balance(costs, 2)
    assert sorted(i for g in groups for i in g) == list(range(12))
    loads = [sum(costs[i] for i in g) for g in groups]
    assert abs(loads[0] - loads[1]) <= 3 and sum(loads) == 102
    assert groups == _balance(costs, 2)
    assert _balance(costs, 1) == [list(range(12))]
    assert len(_balance([5.0, 1.0], 8)) == 2  # never more groups than items


@needs_fork
def test_a_shard_diverging_in_a_child_process_is_one_clear_cli_error(tmp_path, monkeypatch,
                                                                     capsys):
    from moeae import study
    from moeae.cli import main

    parent = os.getpid()
    fit = study.Trainer.fit

    def fit_or_diverge(self, *args, **kwargs):
        if os.getpid() != parent:  # only in the forked shard: its error must cross back
            raise DivergenceError(1, 3, [1])
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(study.Trainer, "fit", fit_or_diverge)
    code = main(["reproduce", "--epochs", "1", "--no-figures", "--threads", "2",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    shards = study._balance([study._model_cost(E) for _ in range(3) for E in (1, 2, 4, 8)], 2)
    child_model = shards[1][1]  # the child's second model, by its place in the whole study
    assert err.strip() == (f"error: training diverged: non-finite loss at epoch 1, step 3 "
                           f"(model(s) [{child_model}]); lower the learning rate or set grad_clip")
    assert not (tmp_path / "r" / "metrics.csv").exists()
