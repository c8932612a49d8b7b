"""The harness's own processes (Open WebUI, PostgreSQL, Redis): each started in its own session on a
free 127.0.0.1 port with its output in a log file, waited for until ready, and always ended."""

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Collection
from pathlib import Path

READY_TIMEOUT = 60.0
POLL_SECONDS = 0.05
STOP_TIMEOUT = 20.0


def free_port(*also_on: str, avoid: Collection[int] = ()) -> int:
    """A port free on 127.0.0.1 (and on each loopback address in `also_on`), none of `avoid`."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in avoid and all(bindable(host, port) for host in also_on):
            return port


def bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def spawn(argv: list[str], log: Path, cwd: Path, **popen_args) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
            **popen_args,
        )


def wait_until(
    ready: Callable[[], bool], process: subprocess.Popen, what: str, log: Path, timeout: float = READY_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited during startup; see {log}")
        if ready():
            return
        time.sleep(POLL_SECONDS)
    raise RuntimeError(f"{what} not ready after {timeout:g} s; see {log}")


def end(process: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    """Stop a process group started by `spawn`, politely first."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, sig)
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT)
    except ProcessLookupError:
        pass
