"""Hostile programs are contained by the sandbox, reported as failed, and the test run goes on.

Most hostile tests run twice: with the in-process Python guards (the default), and with them switched off
(``python_guards=False``) to show that the OS layers alone (namespaces, uid, rlimits) hold; the second run
is skipped where this machine lacks the layer it relies on.
"""

import os
import socket
import textwrap
import time
from pathlib import Path

import pytest

from multitoken.evals.sandbox import (
    SandboxLimits,
    isolation_layers,
    network_isolation,
    run_many,
    run_program,
)

GUARDED = SandboxLimits(timeout_s=3.0)
OS_ONLY = SandboxLimits(timeout_s=3.0, python_guards=False)


def _limits(python_guards: bool, *needs: str, **overrides) -> SandboxLimits:
    """Limits for one run; skip an OS-only run unless one of the ``needs`` layers is active here."""
    if not python_guards and not set(needs) & set(isolation_layers()):
        pytest.skip(f"none of the OS layers {needs} is available on this machine")
    base = GUARDED if python_guards else OS_ONLY
    return SandboxLimits(**{**base.__dict__, **overrides})


def _proc_count() -> int:
    return sum(1 for name in os.listdir("/proc") if name.isdigit())


def test_plain_program_passes_and_output_is_captured():
    res = run_program("x = 21\nprint('hello')", tests="assert x * 2 == 42", limits=GUARDED)
    assert res.passed and res.result == "passed"
    assert res.stdout_tail == "hello\n"


def test_failing_assert_and_syntax_error_fail():
    assert run_program("x = 1", tests="assert x == 2", limits=GUARDED).result == "failed: AssertionError"
    assert run_program("def f(:\n", limits=GUARDED).result.startswith("failed: SyntaxError")


def test_infinite_loop_times_out():
    start = time.monotonic()
    res = run_program("while True: pass", timeout_s=1.0)
    assert not res.passed and res.result == "timed out"
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("python_guards", [True, False])
def test_fork_bomb_is_contained(python_guards):
    # Without guards, allow 20 processes so the bomb really runs until the timeout kills its namespace.
    lim = _limits(python_guards, "pid", timeout_s=1.5, max_processes=1 if python_guards else 20)
    before = _proc_count()
    program = "import posix\nwhile True:\n    try:\n        posix.fork()\n    except OSError:\n        pass\n"
    res = run_program(program, limits=lim)
    assert not res.passed
    time.sleep(0.3)
    assert _proc_count() <= before + 3  # nothing left behind


def test_no_fork_at_all_by_default():
    lim = _limits(False, "uid", "user")
    res = run_program("import posix\nposix.fork()", limits=lim)
    assert res.result.startswith("failed: BlockingIOError"), res.result


def test_huge_allocation_is_refused():
    res = run_program("x = bytearray(50 * 1024**3)", tests="assert len(x) > 0", limits=GUARDED)
    assert not res.passed and res.result == "killed: memory"


def test_printing_gigabytes_is_cut_off():
    res = run_program("while True:\n    print('x' * 1_000_000)", limits=GUARDED)
    assert not res.passed and res.result == "killed: output limit"
    assert len(res.stdout_tail) <= 2000


@pytest.fixture
def canaries(tmp_path):
    """A canary file in a fake home dir and one in this test's own directory."""
    home = tmp_path / "home"
    home.mkdir()
    home_canary = home / "canary.txt"
    home_canary.write_text("home canary")
    here_canary = Path(__file__).with_name(f"_sandbox_canary_{os.getpid()}.txt")
    here_canary.write_text("project canary")
    yield home, home_canary, here_canary
    here_canary.unlink()


@pytest.mark.parametrize("python_guards", [True, False])
def test_files_outside_the_sandbox_are_untouched(canaries, python_guards):
    home, home_canary, here_canary = canaries
    program = textwrap.dedent(
        f"""
        import os, posix, shutil
        for path in ({str(home_canary)!r}, {str(here_canary)!r}):
            for attempt in (lambda: open(path, "w").write("pwned"), lambda: posix.unlink(path),
                            lambda: os.remove(path), lambda: posix.rename(path, path + ".x")):
                try:
                    attempt()
                except Exception:
                    pass
        try:
            shutil.rmtree({str(home)!r})
        except Exception:
            pass
        """
    )
    run_program(program, limits=_limits(python_guards, "rofs", "uid"))
    assert home_canary.read_text() == "home canary"
    assert here_canary.read_text() == "project canary"


def test_environment_and_home_are_private(monkeypatch):
    monkeypatch.setenv("MT_SANDBOX_SECRET", "s3cr3t-value")
    program = textwrap.dedent(
        """
        import os
        print(dict(os.environ))
        assert "MT_SANDBOX_SECRET" not in os.environ
        ssh = os.path.expanduser("~/.ssh")
        assert ssh.startswith(os.environ["HOME"]) and not os.path.exists(ssh)
        """
    )
    res = run_program(program, limits=GUARDED)
    assert res.passed, res.result
    assert "s3cr3t-value" not in res.stdout_tail


def test_cannot_kill_the_parent_with_guards():
    res = run_program("import os\nos.kill(os.getppid(), 9)", limits=GUARDED)
    assert not res.passed
    res = run_program("import posix\nposix.kill(posix.getppid(), 9)", limits=GUARDED)
    assert not res.passed


@pytest.mark.parametrize("target", ["parent", "sentinel", "everyone"])
def test_cannot_kill_the_parent_without_guards(target):
    """With only the OS layers (PID namespace, another uid), a program's SIGKILL reaches neither the
    evaluating process nor a sentinel process of ours."""
    import subprocess
    import sys

    lim = _limits(False, "pid", "uid")
    sentinel = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid = {"parent": os.getpid(), "sentinel": sentinel.pid, "everyone": -1}[target]
        res = run_program(f"import posix\nposix.kill({pid}, 9)", limits=lim)
        assert not res.passed, res.result  # the kill was refused (or took only the program itself)
        time.sleep(0.05)
        assert sentinel.poll() is None, "the sandboxed program killed a process outside the sandbox"
    finally:
        sentinel.kill()
        sentinel.wait()


@pytest.mark.parametrize("python_guards", [True, False])
def test_no_network_connection_arrives(python_guards):
    lim = _limits(python_guards, "net")
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    try:
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')"
        res = run_program(program, limits=lim)
        assert not res.passed
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


def test_network_namespace_when_available():
    if network_isolation() != "namespace":
        pytest.skip("no network namespace on this machine; only the socket patch guards the network")
    program = "devs = [l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]]\nassert devs == ['lo']"
    res = run_program(program, limits=GUARDED)
    assert res.passed, res.result


def test_exiting_before_the_tests_fails():
    for program in ("import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"):
        res = run_program(program, tests="assert False", limits=GUARDED)
        assert not res.passed, program


def test_forged_verdict_is_rejected():
    program = textwrap.dedent(
        """
        import os, posix
        for fd in range(3, 64):
            try:
                posix.write(fd, b"0123456789abcdef0123456789abcdef mount passed\\n")
            except OSError:
                pass
        os._exit(0)
        """
    )
    assert not run_program(program, tests="assert False", limits=GUARDED).passed


@pytest.mark.parametrize(
    "completion",
    [
        "class AssertionError(Exception):\n    pass",
        "import builtins\nbuiltins.AssertionError = type('A', (Exception,), {})",
        "import builtins\nbuiltins.__import__ = lambda *a, **k: None",
        "import builtins\nbuiltins.print = lambda *a, **k: None\nbuiltins.len = lambda x: 3",
        "def check(candidate):\n    pass",
        "import builtins\nbuiltins.check = lambda candidate: None",
        "import sys\nsys.settrace(lambda *a: None)",
        "__builtins__ = {}",
    ],
)
def test_patching_helpers_cannot_skip_asserts(completion):
    tests = "def check(candidate):\n    assert len([1]) == 1\n    assert candidate(2) == 5\ncheck(f)"
    res = run_program("def f(x):\n    return x\n" + completion, tests=tests, limits=GUARDED)
    assert not res.passed and res.result == "failed: AssertionError", res.result


def test_run_many_keeps_order_and_isolates_failures():
    programs = ["assert True", ("x = 1", "assert x == 2"), "while True: pass", ("y = 3", "assert y == 3")]
    results = run_many(programs, workers=4, limits=SandboxLimits(timeout_s=1.5))
    assert [r.passed for r in results] == [True, False, False, True]
    assert results[2].result == "timed out"


def test_isolation_report_is_consistent():
    layers = isolation_layers()
    assert "socket-patch" in layers
    assert network_isolation() == ("namespace" if "net" in layers else "socket-patch")
