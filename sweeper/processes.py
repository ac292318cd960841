"""How the launcher starts worker processes: forked from a template that imported PyTorch once.

A fresh interpreter spends seconds importing what a worker needs before it can claim a trial:
``import torch`` and transformers' model code (``transformers.masking_utils`` alone pulls in
``torch._dynamo``) take about 3 s of CPU on this project's machine, 6 s on a slower one, and a
sweep pays that for every worker it starts, every worker it restarts, and, on a machine whose
cores are few, while the workers already running wait for the CPU. So the launcher starts one
*template* process (the standard library's ``multiprocessing`` fork server), which imports
those modules once, while the launcher itself is still tokenising the data; each worker is
forked from it and starts with everything imported.

A forked worker is set up exactly as a fresh one would be: its own session (Ctrl-C at the
terminal reaches the launcher, which stops the workers in order, not the workers directly), its
output in its log file, the launcher's environment for it (``CUDA_VISIBLE_DEVICES``, the
storage URL), the same exit codes, and at its end the exit handlers a fresh interpreter runs.

The template never touches a GPU: CUDA cannot be used in a process forked from one that has
initialised it. Should a module imported there have asked CUDA anything (torch then flags
every fork as unsafe), the worker notices at its start and replaces itself with a fresh
interpreter (``exec``, same pid, same log), so such a mistake costs its import time and
nothing else. ``SWEEPER_WORKER_START=fresh`` starts every worker as a fresh interpreter, as
sweeper did before; ``SWEEPER_PRELOAD=mod1,mod2`` adds modules the template imports (a study's
own dependencies).
"""

from __future__ import annotations

import atexit
import io
import logging
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from sweeper.errors import SweepError

logger = logging.getLogger(__name__)

# What every worker process runs, `python -m sweeper ARGV`, whether forked or fresh. This module
# names the program rather than importing it: the CLI is the layer above, which starts launchers.
PROGRAM = "sweeper"
ENV_START = "SWEEPER_WORKER_START"  # "template" (the default where the OS can fork) or "fresh"
ENV_PRELOAD = "SWEEPER_PRELOAD"  # comma-separated modules the template imports besides the core
START_MODES = ("template", "fresh")
# What a worker imports before its first trial ends: the worker loop, the objective, the training
# loop and, through them, torch, numpy, optuna and SQLAlchemy; then what each kind of model needs
# (transformers' model code for encoders, torchvision for ResNets). The template imports all of
# it, whatever the study: it starts before the study file is read, and a module a study does not
# use costs the template a second once, never a worker. One that is not installed is skipped.
CORE_IMPORTS = ("sweeper.cli", "sweeper.worker", "sweeper.objective", "sweeper.checkpoints", "safetensors.torch")
MODEL_IMPORTS = ("transformers.modeling_utils", "transformers.masking_utils", "transformers.models.auto.modeling_auto",
                 "transformers.models.bert.modeling_bert", "torchvision")
LOST_EXIT_CODE = 255  # what multiprocessing reports for a child whose template died before it


class WorkerProcess(Protocol):
    """What the launcher needs of a worker process (``subprocess.Popen`` has all of it)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


def worker_command(argv: Sequence[str]) -> list[str]:
    """The command line of a fresh worker interpreter running ``sweeper ARGV``."""
    return [sys.executable, "-m", PROGRAM, *argv]


class FreshStarter:
    """Every worker a new interpreter (``SWEEPER_WORKER_START=fresh``, or no fork on this OS)."""

    def warm_up(self) -> None:
        pass

    def start(self, argv: Sequence[str], env: dict[str, str], log: Path) -> WorkerProcess:
        with open(log, "ab") as out:
            return subprocess.Popen(worker_command(argv), env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)


class ForkedWorker:
    """A worker forked from the template; the template tells its exit code."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self._process = process
        pid = process.pid
        assert pid is not None  # started; not user input
        self._pid = pid

    @property
    def pid(self) -> int:
        return self._pid

    def poll(self) -> int | None:
        code = self._process.exitcode
        if code == LOST_EXIT_CODE and _running(self._pid):
            # The template died, and with it the only process that can tell this worker's exit
            # code. The worker still runs, and its trial must not be failed as a dead one's: ask
            # the kernel until it ends. (Its own exit code is lost then; the launcher takes it
            # for a death, and the worker it starts instead finds the budget spent, or goes on.)
            return None
        return code

    def send_signal(self, sig: int) -> None:
        try:
            os.kill(self._pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class TemplateStarter:
    """Workers forked from one template process that has imported what workers need.

    The template is multiprocessing's fork server, one per launcher process: the first
    starter's ``imports`` are the ones it holds.
    """

    def __init__(self, imports: Sequence[str] = ()) -> None:
        self.imports = list(dict.fromkeys([*CORE_IMPORTS, *MODEL_IMPORTS, *imports]))
        self._context = multiprocessing.get_context("forkserver")
        self._broken: str | None = None  # why the template cannot start workers, once it could not

    def warm_up(self) -> None:
        """Start the template now, so that it imports while the launcher prepares the data."""
        from multiprocessing import forkserver

        if self._broken is not None:
            return
        try:
            self._context.set_forkserver_preload(self.imports)
            forkserver.ensure_running()  # a no-op while it runs; a new template if the last one died
        except OSError as exc:  # no room for its socket in the temporary folder, no processes left
            self._give_up(exc)

    def start(self, argv: Sequence[str], env: dict[str, str], log: Path) -> WorkerProcess:
        self.warm_up()
        if self._broken is None:
            process = self._context.Process(target=_forked_main, args=(list(argv), dict(env), str(log)),
                                            name=f"sweeper {' '.join(argv[:2])}")
            try:
                process.start()
                return ForkedWorker(process)
            except (OSError, EOFError) as exc:  # it could not fork, or died importing
                self._give_up(exc)
        return FreshStarter().start(argv, env, log)

    def _give_up(self, exc: BaseException) -> None:
        """From now on every worker starts as a new interpreter; said once."""
        self._broken = f"{type(exc).__name__}: {exc}"
        logger.warning("the worker template cannot start workers (%s); starting each worker as a new "
                       "interpreter instead (%s=fresh does so from the start)", self._broken, ENV_START)


Starter = FreshStarter | TemplateStarter


def starter() -> Starter:
    """The starter ``SWEEPER_WORKER_START`` asks for; a template wherever the OS can fork, with
    the modules ``SWEEPER_PRELOAD`` names besides sweeper's own."""
    mode = os.environ.get(ENV_START, "template").strip().lower() or "template"
    if mode not in START_MODES:
        raise SweepError(f"{ENV_START} is {mode!r}: use template (fork workers from a process that "
                         "imported PyTorch once) or fresh (a new interpreter per worker)")
    if mode == "fresh" or "forkserver" not in multiprocessing.get_all_start_methods():
        return FreshStarter()
    return TemplateStarter([name.strip() for name in os.environ.get(ENV_PRELOAD, "").split(",") if name.strip()])


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not: nobody may be left to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the number: ours is gone
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:  # no /proc (macOS): a zombie passes for a live process there
        return True
    return state not in ("Z", "X")


def _forked_main(argv: list[str], env: dict[str, str], log: str) -> None:
    """The first code of a forked worker: become what a fresh worker would be, then run it."""
    os.setsid()  # as start_new_session: the terminal's Ctrl-C goes to the launcher only
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    os.environ.clear()
    os.environ.update(env)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda._is_in_bad_fork():
        # Something in the template asked CUDA a question; CUDA would fail in this process.
        os.write(2, b"sweeper: the worker template had touched CUDA; this worker starts as a "
                    b"fresh interpreter instead\n")
        os.execve(sys.executable, worker_command(argv), env)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(write_through=True)  # PYTHONUNBUFFERED, as the launcher sets it
    sys.argv = [PROGRAM, *argv]
    if os.getcwd() not in sys.path:  # `python -m sweeper` puts the working folder first: so do we
        sys.path.insert(0, os.getcwd())
    try:
        # What `python -m sweeper` runs, on modules the template imported already: the command's
        # exit code leaves as SystemExit, which multiprocessing makes the exit code of this process.
        runpy.run_module(PROGRAM, run_name="__main__")
    finally:
        # multiprocessing ends a forked process with os._exit, which skips the exit handlers
        # (inductor's compile pool, logging) that a fresh interpreter's worker would run.
        atexit._run_exitfuncs()
