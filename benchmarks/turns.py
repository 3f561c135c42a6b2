"""Turns on the device: worker processes of a benchmark compile at once, and time one by one.

The protocol between a parent (``run_batch``) and the worker processes it starts, each with its
stdin and stdout piped to the parent:

- a worker is "busy" from its start: it builds its model, compiles, runs untimed calls;
- before a timed part it prints ``TURN_READY`` (``device_turn``) and waits for ``go`` on stdin;
- after the timed part it prints ``TURN_DONE`` and waits for ``next`` on stdin; then it is busy
  again (its next timed part's compile) until its next ``TURN_READY``, or it exits.

The parent says ``go`` to the longest-ready worker only while no worker of the batch is busy or
timing, and ``next`` to all of them once every one has timed this round (each waits for ``next``).
So while a worker times, every other worker of the batch blocks on its stdin: nobody else
compiles or runs. A worker that exits (finished, crashed, killed) leaves the batch at once and
never holds the others up; past the deadline every worker left is killed.

Imports nothing but the standard library: the parent needs no torch.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

# Lines a worker writes to ask its parent for the device, and to hand it back.
TURN_READY, TURN_DONE = "@@turn-ready", "@@turn-done"


# --- worker side ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def device_turn(enabled: bool, label: str = "") -> Iterator[list[float]]:
    """Around a worker's timed part: wait for the parent's ``go`` before it, and for its ``next`` after it.

    The parent grants one turn at a time, and only while every other worker of the batch waits:
    nobody compiles or runs while this one times. Waiting for ``next`` keeps a worker from
    compiling its next part while the others still time this round. ``label`` (a case name) only
    annotates the marker lines. Not ``enabled`` (a worker run on its own): no waiting. Yields the
    turn's wall-clock window (``time.time()``): ``[start]``, and ``[start, end]`` once it ends.
    """
    if enabled:
        print(f"{TURN_READY} {label}", flush=True)
        if sys.stdin.readline().strip() != "go":
            raise RuntimeError("the parent ended the run")
    window = [time.time()]
    try:
        yield window
    finally:
        window.append(time.time())
        if enabled:
            print(f"{TURN_DONE} {label}", flush=True)
            sys.stdin.readline()  # "next", or end of input


# --- parent side ---------------------------------------------------------------------------------------------


class Worker:
    """One worker process: reports its turn requests and its exit as events; keeps the last lines of its output.

    stderr goes into stdout. Every other line than the turn markers is written to ``echo`` (if
    any), kept in ``tail`` (the last ``tail_lines``) and, where ``keep(line)``, in ``kept`` (all of
    them: a worker's result lines, say). ``env``: variables set for this process on top of the
    parent's. The process leads a session of its own, so ``kill`` ends whatever it started too.
    """

    def __init__(
        self,
        command: Sequence[str],
        events: queue.Queue,
        *,
        echo: TextIO | None = None,
        keep: Callable[[str], bool] | None = None,
        tail_lines: int = 40,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.command = list(command)
        self.echo, self.keep = echo, keep
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.kept: list[str] = []
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
            start_new_session=True,
        )
        threading.Thread(target=self._pump, args=(events,), daemon=True).start()

    def _pump(self, events: queue.Queue) -> None:
        for line in self.proc.stdout:
            if line.startswith(TURN_READY):
                events.put((self, "ready"))
            elif line.startswith(TURN_DONE):
                events.put((self, "done"))
            else:
                if self.echo is not None:
                    self.echo.write(line)
                    self.echo.flush()
                line = line.rstrip("\n")
                self.tail.append(line.rstrip())
                if self.keep is not None and self.keep(line):
                    self.kept.append(line)
        events.put((self, "exit"))

    def send(self, word: str) -> None:
        with contextlib.suppress(OSError):  # it may have died meanwhile: its exit event follows
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@dataclass
class Outcome:
    """How one worker of a batch ended: its exit status, and what it printed (see ``Worker``)."""

    returncode: int
    timed_out: bool  # killed at the deadline
    seconds: float  # from its start to its exit
    tail: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def run_batch(
    commands: Sequence[Sequence[str]],
    deadline: float | None = None,
    *,
    echo: TextIO | None = None,
    keep: Callable[[str], bool] | None = None,
    tail_lines: int = 40,
    envs: Sequence[Mapping[str, str]] | None = None,
) -> list[Outcome]:
    """Run these worker commands at once; their timed parts one at a time, while nobody else compiles or runs.

    A worker is "busy" (building, compiling, its untimed calls), "ready" (asks for the device),
    "timing" (holds it) or "waiting" (timed, waits for the others). The device goes to the
    longest-ready worker when nobody is busy or timing; everybody goes on (``next``) once all have
    timed. A worker that exits leaves the batch. Past ``deadline`` (``time.monotonic()``) every
    worker left is killed. Returns an ``Outcome`` per command, in their order; ``echo``, ``keep``
    and ``tail_lines`` as for ``Worker``, ``envs`` each command's ``env``.
    """
    events: queue.Queue = queue.Queue()
    envs = envs or [{}] * len(commands)
    workers = [
        Worker(command, events, echo=echo, keep=keep, tail_lines=tail_lines, env=env)
        for command, env in zip(commands, envs, strict=True)
    ]
    state = dict.fromkeys(workers, "busy")
    timed_out: set[Worker] = set()
    ended: dict[Worker, float] = {}
    ready: list[Worker] = []
    try:
        while state:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                worker, event = events.get(timeout=timeout)
            except queue.Empty:
                for worker in state:
                    worker.kill()
                    timed_out.add(worker)
                deadline = None
                continue
            if event == "ready":
                state[worker] = "ready"
                ready.append(worker)
            elif event == "done":
                state[worker] = "waiting"
            else:  # exit
                state.pop(worker)
                if worker in ready:
                    ready.remove(worker)
                worker.proc.wait()
                ended[worker] = time.monotonic()
                with contextlib.suppress(OSError):
                    worker.proc.stdin.close()
            if any(s in ("busy", "timing") for s in state.values()):
                continue
            if ready:
                worker = ready.pop(0)
                state[worker] = "timing"
                worker.send("go")
            elif state:  # everybody has timed this round
                for worker in state:
                    state[worker] = "busy"
                    worker.send("next")
    finally:  # interrupted (Ctrl-C): no worker outlives the parent
        for worker in state:
            worker.kill()
    return [
        Outcome(
            returncode=w.proc.returncode,
            timed_out=w in timed_out,
            seconds=ended[w] - w.started,
            tail=list(w.tail),
            kept=list(w.kept),
        )
        for w in workers
    ]
