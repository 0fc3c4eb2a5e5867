"""Starting `multitoken serve` as a subprocess on a free loopback port, and finding its engine process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint, *flags: str, timeout: float = 90) -> tuple[subprocess.Popen, str]:
    """`multitoken serve` on the CPU in float64 with `flags`, once /health answers 200."""
    port = free_port()
    argv = [sys.executable, "-m", "multitoken", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    argv += ["--dtype", "float64", "--device", "cpu", "--log-level", "warning", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail("server did not become healthy")


def children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def engine_pid(server_pid: int) -> int:
    """The engine process among the server's children (the other is multiprocessing's resource tracker)."""
    engines = [k for k in children(server_pid) if b"resource_tracker" not in _cmdline(k)]
    assert len(engines) == 1, engines
    return engines[0]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting for its parent's wait() counts as ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return "zombie" not in state and " Z" not in state


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()
