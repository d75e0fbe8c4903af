import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The CI machine has 2 cores; two torch threads collapse when a core is busy.
    torch.set_num_threads(1)
    yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# -- the command line as a process (tests/test_cli_errors.py, test_checkpoints.py) --------------
# Starting ``python -m moeae.cli`` costs 3-5 s of imports (torch, torch._dynamo, scikit-learn),
# so ``cli()`` runs each command in a child forked from one server process that has done those
# imports once: a real process with its own exit code, stdout, stderr and cwd, running
# ``moeae.cli`` as ``__main__`` exactly as ``python -m`` does. ``cli(..., fresh=True)`` (or the
# environment variable ``MOEAE_TEST_FRESH=1`` for every call) starts a new interpreter instead.
import json  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # for the processes the tests start

CLI = [sys.executable, "-m", "moeae.cli"]

_SERVER = r'''
import json, os, runpy, signal, sys, time, traceback
import numpy, torch, sklearn, safetensors  # the slow imports, done once
import torch._dynamo  # what the first torch.optim optimizer imports (3 s)
import moeae, moeae.checkpoint, moeae.data, moeae.run, moeae.training  # runpy runs moeae.cli
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the child: behave as `python -m moeae.cli ARGS` run in req["cwd"]
        code = 1
        try:
            os.chdir(req["cwd"])
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            os.dup2(os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            sys.argv = ["moeae", *req["args"]]
            try:
                runpy.run_module("moeae.cli", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exc:  # as the interpreter treats it
                code = exc.code
                if code is None:
                    code = 0
                elif not isinstance(code, int):
                    print(code, file=sys.stderr)
                    code = 1
            except BaseException:
                traceback.print_exc()  # what the interpreter prints for an uncaught exception
                code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + req["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            rc = "timeout"
            break
        time.sleep(0.005)
    print(json.dumps({"rc": rc}), flush=True)
'''


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


class _Server:
    def __init__(self, workdir: Path):
        self.workdir, self.proc, self.lock, self.n = workdir, None, threading.Lock(), 0

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"CLI test server did not start: {line!r}")

    def run(self, args: list[str], cwd: Path, timeout: float) -> Result:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            self.n += 1
            out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
            req = {"args": args, "cwd": str(cwd), "out": str(out), "err": str(err),
                   "timeout": timeout}
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
            if not reply:
                raise RuntimeError("CLI test server died")
            rc = json.loads(reply)["rc"]
            if rc == "timeout":
                raise subprocess.TimeoutExpired(["moeae", *args], timeout)
            return Result(rc, out.read_text(), err.read_text())

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def _cli_server(tmp_path_factory):
    server = _Server(tmp_path_factory.mktemp("cli-io"))
    yield server
    server.close()


@pytest.fixture(scope="session")
def cli(_cli_server, tmp_path_factory):
    """``cli(*args, cwd=None, timeout=120, fresh=False) -> Result``: run ``moeae ARGS``."""
    default_cwd = tmp_path_factory.mktemp("cli-cwd")

    def run(*args, cwd=None, timeout: float = 120, fresh: bool = False) -> Result:
        args = [str(a) for a in args]
        cwd = Path(cwd or default_cwd)
        if fresh or os.environ.get("MOEAE_TEST_FRESH") == "1":
            p = subprocess.run(CLI + args, cwd=cwd, capture_output=True, text=True,
                               timeout=timeout)
            return Result(p.returncode, p.stdout, p.stderr)
        return _cli_server.run(args, cwd, timeout)

    return run


def assert_error(res: Result, *fragments, code: int = 1) -> str:
    """Exit ``code``, stderr exactly one line ``error: ...`` containing every fragment, and
    no traceback. Returns the line."""
    assert res.returncode == code, res
    assert "Traceback" not in res.stderr + res.stdout, res
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res
    for f in fragments:
        assert str(f) in lines[0], f"{f!r} not in {lines[0]!r}"
    return lines[0]


def assert_usage_error(res: Result, *fragments) -> str:
    """argparse's usage error: exit 2, a usage line and ``moeae ...: error: ...`` last."""
    assert res.returncode == 2, res
    assert "Traceback" not in res.stderr + res.stdout, res
    last = res.stderr.strip().splitlines()[-1]
    assert "error: " in last and res.stderr.startswith("usage: "), res
    for f in fragments:
        assert str(f) in last, f"{f!r} not in {last!r}"
    return last


class MarkerPickle:
    """Unpickling this creates ``marker`` (through ``open``, no shell)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def planted_pickle(marker: Path) -> bytes:
    return pickle.dumps(MarkerPickle(marker))


def write_bad_inputs(d: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """Bad input files for ``train --data``, ``encode`` and ``load_array``: name -> (path,
    fragments the error message must contain besides the path)."""
    d.mkdir(parents=True, exist_ok=True)
    cases: dict[str, tuple[Path, tuple[str, ...]]] = {}

    def add(name, filename, fragments, content=None, array=None, **save_kw):
        p = d / filename
        if content is not None:
            p.write_bytes(content if isinstance(content, bytes) else content.encode())
        elif array is not None:
            np.save(p, array, **save_kw)
        cases[name] = (p, fragments)

    add("missing_npy", "missing.npy", ("no such file",))
    add("missing_csv", "missing.csv", ("no such file",))
    add("empty_npy", "empty.npy", ("empty",), content=b"")
    add("empty_csv", "empty.csv", ("empty",), content="")
    add("blank_csv", "blank.csv", ("empty",), content="\n  \n\n")
    add("header_only_csv", "header_only.csv", ("no data rows",), content="x,y\n")
    add("nonnumeric_csv", "nonnumeric.csv", ("line 4", "'abc'"),
        content="x,y\n1,2\n3,4\nabc,5\n")
    add("nonnumeric_csv_no_header", "nonnumeric2.csv", ("line 1", "'1.o'"),
        content="1.o,2\n3,4\n")
    add("ragged_csv", "ragged.csv", ("ragged", "line 3", "3 values", "expected 2"),
        content="1,2\n3,4\n5,6,7\n")
    add("nan_npy", "nan.npy", ("NaN", "row 1"), array=np.array([[0.0, 1.0], [np.nan, 2.0]]))
    add("nan_csv", "nan.csv", ("NaN",), content="1,2\nnan,3\n")
    add("inf_npy", "inf.npy", ("inf", "row 0, column 1"),
        array=np.array([[0.0, np.inf], [1.0, 2.0]]))
    add("complex_npy", "complex.npy", ("complex",), array=np.ones((4, 2), dtype=complex))
    add("object_npy", "object.npy", ("object", "pickle"),
        array=np.array([[1.0, 2.0], [3.0, "a"]], dtype=object), allow_pickle=True)
    add("oned_npy", "oned.npy", ("2-D", "1-D", "(5,)"), array=np.arange(5.0))
    add("threed_npy", "threed.npy", ("2-D", "(2, 3, 2)"), array=np.ones((2, 3, 2)))
    add("string_npy", "string.npy", ("not numeric",), array=np.array([["a", "b"]]))
    add("not_npy", "garbage.npy", ("not a .npy file",), content=os.urandom(64))
    add("unsupported_suffix", "data.json", ("unsupported", "'.json'"), content="[[1, 2]]")
    return cases


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory):
    return write_bad_inputs(tmp_path_factory.mktemp("bad-inputs"))


TRAIN_TINY = ("--data", "circle", "--experts", "2", "--recipe", "seed", "--n-samples", "200",
              "--threads", "1")


@pytest.fixture(scope="session")
def tiny_run_dir(cli, tmp_path_factory) -> Path:
    """A tiny trained run folder (circle, 2 experts, seed recipe, 1 epoch). Read-only: copy it
    (shutil.copytree) before changing anything in it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    res = cli("train", *TRAIN_TINY, "--epochs", "1", "--seed", "0", "--out", out)
    assert res.returncode == 0, res
    return out


@pytest.fixture(scope="session")
def tiny_points(tmp_path_factory) -> Path:
    """A valid (50, 2) .npy input for the tiny run."""
    p = tmp_path_factory.mktemp("tiny_points") / "tiny_points.npy"
    np.save(p, np.random.default_rng(0).normal(size=(50, 2)))
    return p
