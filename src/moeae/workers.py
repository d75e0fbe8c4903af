"""Forked worker processes: the figure workers of ``moeae reproduce`` and the shards of a
population trained side by side.

Why processes and not threads: the models of a population are independent, and on this
2-core CPU two processes of one torch thread each train the seed study's two halves in 2.3-2.8
s where one process with two threads needs 4.3-4.9 s (measured in one run, alternating): the
batched matmuls are small, so two threads spend much of their time waiting on each other, and
they collapse when another process takes a core.

Workers are plain ``fork`` children that answer jobs sent over a pipe (no helper threads in
this process, unlike :class:`multiprocessing.pool.Pool`, so forking again later is safe). Where
``fork`` does not exist, :func:`fork_map` runs everything here, one item after another.
"""

from __future__ import annotations

import multiprocessing
import pickle
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Worker", "fork_map", "can_fork", "WorkerError"]


class WorkerError(RuntimeError):
    """A worker process died or its error could not be sent back."""


def can_fork() -> bool:
    """Linux only: on macOS, forking a process that has loaded torch's native libraries can
    crash the child (the Objective-C runtime is not fork-safe); Windows has no fork."""
    return sys.platform.startswith("linux")


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - send what can be sent
        return WorkerError(f"{type(exc).__name__}: {exc}")


def _serve(conn, initializer: Callable[[], Any] | None) -> None:
    if initializer is not None:
        initializer()
    while True:
        try:
            job = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if job is None:
            return
        fn, args, kwargs = job
        try:
            reply = (True, fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            reply = (False, _picklable(exc))
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001 - e.g. a result that does not pickle
            conn.send((False, WorkerError(f"could not send the result back: {exc}")))


class Worker:
    """One forked process that runs the jobs sent to it, in order.

    ``initializer`` runs first in the child (e.g. an import that should happen while this
    process does something else). :meth:`submit` queues ``fn(*args, **kwargs)``; :meth:`result`
    returns the oldest unanswered job's value or raises its exception here.
    """

    def __init__(self, initializer: Callable[[], Any] | None = None):
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        # not a daemon: a worker may fork workers of its own (fork_map in a figure worker);
        # whoever starts one closes or kills it
        self._proc = ctx.Process(target=_serve, args=(child, initializer))
        self._proc.start()
        child.close()

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        """Queue ``fn(*args, **kwargs)`` in the worker (``fn`` and its arguments pickled)."""
        self._conn.send((fn, args, kwargs))

    def result(self) -> Any:
        """The oldest unanswered job's return value; its exception is raised here."""
        try:
            ok, value = self._conn.recv()
        except EOFError:
            self._proc.join()
            raise WorkerError(f"worker process {self._proc.pid} died (exit code "
                              f"{self._proc.exitcode})") from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Ask the worker to finish its jobs and exit, and wait for it."""
        try:
            self._conn.send(None)
        except OSError:  # already gone
            pass
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()

    def kill(self) -> None:
        self._proc.kill()
        self._proc.join()
        self._conn.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fork_map(fn: Callable, items: Sequence, initializer: Callable[[], Any] | None = None
             ) -> list:
    """``[fn(item) for item in items]``: the first item here, each other in a forked child,
    all at once. A child's exception is raised here (the first by item order)."""
    if len(items) <= 1 or not can_fork():
        return [fn(item) for item in items]
    workers = [Worker(initializer) for _ in items[1:]]
    try:
        for w, item in zip(workers, items[1:]):
            w.submit(fn, item)
        first = fn(items[0])
        results = [first] + [w.result() for w in workers]
    except BaseException:
        for w in workers:  # nobody will read their results
            w.kill()
        raise
    for w in workers:
        w.close()
    return results
