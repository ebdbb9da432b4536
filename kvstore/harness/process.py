"""One server subprocess, from start to stop, and the waits around several.

``ServerProcess`` starts a command with its output (stdout and stderr
together) appended to a log file or, without one, kept in memory; knows
whether it still runs, by its ``Popen`` when this process started it, else
by pid *and* a marker its command line contains (so a pid the system has since
given to another program is never signalled); and stops it: SIGTERM, SIGKILL
past a timeout. ``DaemonProcess`` and ``EtcdProcess`` add their commands and
readiness checks; the bench's peers (Redis, Mooncake, LMCache) use it as it is.

``wait_ready`` waits for several processes at once and ``terminate_all``
stops several at once, each one signal to all and then one wait.
"""

from __future__ import annotations

import collections
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

# Lines of output kept in memory when there is no log file: all of a test's
# daemon, and a bound for a long bench run.
LOG_LINES = 10_000
# How much of a log an error message quotes.
TAIL_LINES = 15


class HarnessError(RuntimeError):
    """Something the user must hear about; the message says what and where."""


class StartError(HarnessError):
    """A process exited while starting or did not become ready in time; the message ends with its log."""


def process_running(pid: int, marker: str = "") -> bool:
    """Whether ``pid`` is a live (not zombie) process whose command line contains ``marker``."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process: not one of ours
    proc = Path("/proc")
    if not (proc / "self").exists():
        return True  # no procfs: the pid is all we can go by
    try:
        stat = (proc / str(pid) / "stat").read_text()
        cmdline = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False
    if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
        return False  # exited, waiting to be reaped
    return not marker or marker in cmdline.replace(b"\0", b" ").decode(errors="replace")


def die_with_parent() -> list[str]:
    """A command prefix that has the kernel SIGTERM the server if this process dies without
    stopping it (util-linux's ``setpriv --pdeathsig``; it fires when the thread that started
    the server exits, so start such servers from the main thread). Not a ``preexec_fn``: that
    makes subprocess fork rather than vfork, and gRPC's fork handlers then restart its poller
    in the child, whose epoll fd the child's close_fds closes before exec: SIGABRT."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


class ServerProcess:
    """One server subprocess, named ``name`` in messages.

    ``log_file``: output appended there (each start is headed by a line with
    its command), else kept in memory (the last ``LOG_LINES`` lines).
    ``detach``: its own session and no stdin, so that it outlives this process
    (what ``kvstore cluster up`` starts). ``die_with_parent``: SIGTERMed by the
    kernel if this process dies first (see ``die_with_parent()``).
    ``pid``/``marker``: a process started elsewhere (recorded in a state file),
    recognised by its pid and the marker on its command line.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str] = (),
        *,
        env: dict | None = None,
        cwd: str | os.PathLike | None = None,
        log_file: str | os.PathLike | None = None,
        detach: bool = False,
        die_with_parent: bool = False,
        pid: int = 0,
        marker: str = "",
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.cwd = cwd
        self.log_file = Path(log_file) if log_file is not None else None
        self.detach = detach
        self.die_with_parent = die_with_parent
        self.marker = marker
        self.proc: subprocess.Popen | None = None
        self._pid = pid
        self._lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self._drain: threading.Thread | None = None

    # -- what runs ---------------------------------------------------------------

    def command(self) -> list[str]:
        """The command line (subclasses build theirs)."""
        return list(self.argv)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else self._pid

    @property
    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None  # reaps it once it has exited
        return process_running(self._pid, self.marker)

    @property
    def returncode(self) -> int | None:
        """The exit status, once a process this one started has exited (None otherwise)."""
        return self.proc.poll() if self.proc is not None else None

    def ready(self) -> bool:
        """Whether it serves; subclasses ask the server itself."""
        return self.running

    # -- starting ------------------------------------------------------------------

    def start(self) -> "ServerProcess":
        """Spawn the command (without waiting for it to be ready)."""
        if self.running:
            raise HarnessError(f"{self.name} is already running (pid {self.pid})")
        cmd = self.command()
        spawn = (die_with_parent() if self.die_with_parent and not self.detach else []) + cmd
        options = dict(stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd, start_new_session=self.detach)
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_file, "ab") as log:
                log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} started: {shlex.join(cmd)}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(spawn, stdout=log, stderr=subprocess.STDOUT, **options)
        else:
            self.proc = subprocess.Popen(
                spawn, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", **options
            )
            self._drain = threading.Thread(target=self._read, args=(self.proc,), name=f"{self.name}-log", daemon=True)
            self._drain.start()
        self._pid = self.proc.pid
        return self

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self._lines.append(line)

    def wait_ready(self, timeout: float) -> "ServerProcess":
        wait_ready([self], timeout)
        return self

    # -- its output ------------------------------------------------------------------

    @property
    def log(self) -> list[str]:
        """Its output, line by line (with line ends): the log file's, every start; or what is kept in memory."""
        if self.log_file is None:
            return list(self._lines)
        try:
            return self.log_file.read_text(errors="replace").splitlines(keepends=True)
        except OSError:
            return []

    def log_tail(self, lines: int = 30) -> str:
        return "".join(self.log[-lines:])

    def log_end(self) -> str:
        """The end of its log, headed by where the whole of it is (for error messages)."""
        where = self.log_file or "its output"
        return f"the end of {where}:\n{self.log_tail(TAIL_LINES).rstrip()}"

    def wait_for_log(self, text: str, timeout: float) -> bool:
        """Whether ``text`` appears in its output within ``timeout`` seconds (False at once if it exits)."""
        deadline = time.monotonic() + timeout
        while True:
            if any(text in line for line in self.log):
                return True
            if not self.running or time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    # -- stopping ------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        """Send ``sig`` if it still runs (never to a pid that is no longer this process)."""
        if not self.running:
            return
        try:
            if self.proc is not None:
                self.proc.send_signal(sig)
            else:
                os.kill(self._pid, sig)
        except ProcessLookupError:
            pass

    def terminate(self, timeout: float = 30) -> int | None:
        """SIGTERM, and wait for it to exit; the exit status. HarnessError if it still
        runs after ``timeout`` seconds (it is left running: a drain that hangs is the news)."""
        self.signal(signal.SIGTERM)
        self.signal(signal.SIGCONT)  # a frozen process acts on SIGTERM only once it runs again
        _wait_gone([self], time.monotonic() + timeout)
        if self.running:
            raise HarnessError(f"{self.name} (pid {self.pid}) still runs {timeout:.0f} s after SIGTERM")
        return self._exited()

    def stop(self, timeout: float = 30) -> int | None:
        """Make sure it is gone: SIGTERM, SIGKILL if it still runs after ``timeout`` seconds;
        the exit status."""
        terminate_all([self], timeout)
        return self._exited()

    def kill9(self) -> int | None:
        """SIGKILL, then wait for it to be gone; the exit status."""
        self.signal(signal.SIGKILL)
        _wait_gone([self], time.monotonic() + 10)
        return self._exited()

    def _exited(self) -> int | None:
        if self._drain is not None:
            self._drain.join(5)  # the last lines it wrote
        return self.returncode


def _wait_gone(processes: Iterable[ServerProcess], deadline: float) -> None:
    processes = list(processes)
    while any(p.running for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)


def terminate_all(processes: Sequence[ServerProcess], wait: float) -> list[str]:
    """SIGTERM every one that runs at once, wait up to ``wait`` seconds for them all,
    SIGKILL those left. Per process, in order: "stopped", "killed", "still running"
    (not even SIGKILL ended it within 10 s) or "not running" (it was not)."""
    live = [p for p in processes if p.running]
    for p in live:
        p.signal(signal.SIGTERM)
        p.signal(signal.SIGCONT)  # a frozen process acts on SIGTERM only once it runs again
    _wait_gone(live, time.monotonic() + wait)
    killed = [p for p in live if p.running]
    for p in killed:
        p.signal(signal.SIGKILL)
    _wait_gone(killed, time.monotonic() + 10)
    results = []
    for p in processes:
        if not any(p is q for q in live):
            results.append("not running")
        elif not any(p is q for q in killed):
            results.append("stopped")
        else:
            results.append("still running" if p.running else "killed")
    return results


def wait_ready(processes: Sequence[ServerProcess], timeout: float) -> None:
    """Wait until every one of ``processes`` is ready; StartError, with the end of its
    log, as soon as one exits, or when ``timeout`` seconds pass."""
    pending = list(processes)
    deadline = time.monotonic() + timeout
    while True:
        for p in list(pending):
            if not p.running:
                raise StartError(f"{p.name} exited with status {p.returncode}; {p.log_end()}")
            if p.ready():
                pending.remove(p)
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(p.name for p in pending)
            raise StartError(f"{names} did not answer within {timeout:.0f} s; {pending[0].log_end()}")
        time.sleep(0.1)
