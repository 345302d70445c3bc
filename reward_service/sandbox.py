"""Run a model's Python response against a record's tests, for ``kind: code`` rewards; reward = fraction passed.

A run: ``unshare`` (new mount, network, pid, IPC namespaces) -> ``/bin/sh`` as pid 1, which makes every mount a
stranger could write to read-only except the run's private directory -> ``setpriv`` (sandbox user, no capabilities,
no_new_privs) -> ``python -I -S -B`` running ``_HARNESS``: it sets the rlimits, execs the code in a fresh namespace,
then each test statement in it, and writes ``<nonce> <passed> <reason> <detail>`` to a pipe only it is told about.
Past ``wall_seconds`` the parent SIGKILLs pid 1 and the process group; pid 1 dying makes the kernel kill every
process left in the namespace, also those that left the group. As root the code runs as ``user`` (``nobody``); as
anyone else it runs as the current user (root of a user namespace, every capability dropped).

NOT protected against (add a VM or seccomp layer if these matter):
- kernel exploits and side channels: the code shares the host kernel.
- forged results from a determined program: the tests run in the code's interpreter, so it can dig the nonce out of
  the harness's memory (frames, gc) and report what it likes, or cheat the tests (an object whose ``__eq__`` is
  always True, patched builtins). The nonce and the one-line rule stop only blind forgery (a printed result line,
  writes to the report fd without the nonce, extra lines).
- reading world-readable host files (source trees, /etc); writing to world-writable places other than those under
  /, /tmp, /var/tmp, /dev/shm, /run/lock (read-only in the sandbox); when not root, anything the current user can.
- CPU and memory pressure on other processes within the limits (rlimits, not cgroups). RLIMIT_NPROC counts all
  processes of the sandbox user, so concurrent runs as root share ``max_processes``: a run that holds them (a fork
  bomb that sleeps) can make a concurrent run fail to start (reason "crash") for up to ``wall_seconds``.
Also: a solution that hangs in one test scores 0 (no partial credit); only the standard library is importable.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields

REASONS: tuple[str, ...] = ("ok", "failed", "timeout", "memory", "cpu", "crash", "syntax", "no_tests", "output")
"""ok: all tests passed; failed: some failed; timeout: killed at wall_seconds; memory: MemoryError; cpu: RLIMIT_CPU
signal; crash: the code raised or the process died otherwise; syntax: the code does not compile; no_tests: nothing
to run; output: the process ended without exactly one valid report line."""

_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_GRACE_S = 2.0  # how long to wait for processes we have just SIGKILLed
_TAIL = 400  # characters of stderr kept for ``detail``


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 2
    """RLIMIT_CPU soft limit (SIGXCPU); the hard limit (SIGKILL) is one second later"""
    wall_seconds: float = 5.0
    """wall-clock time after which the whole run is killed"""
    memory_mb: int = 512
    """RLIMIT_AS (address space); allocations past it raise MemoryError"""
    file_size_mb: int = 1
    """RLIMIT_FSIZE: largest file the code can write"""
    max_processes: int = 32
    """RLIMIT_NPROC: processes (and threads) of the sandbox user"""

    def __post_init__(self):
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"SandboxLimits.{f.name} must be > 0, got {getattr(self, f.name)!r}")


@dataclass(frozen=True)
class SandboxResult:
    passed: int
    total: int
    reason: str  # one of REASONS
    detail: str = ""

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be set up here (no namespaces, missing tools, no unprivileged user)."""


def extract_code(response: str) -> str:
    """The code in a response: the last ```python (or plain ```) fenced block if any, else the whole text."""
    blocks, lang, lines = [], None, []  # lang is None outside a fence
    for line in response.splitlines():
        if line.strip().startswith("```"):
            if lang is None:
                lang, lines = line.strip()[3:].strip().lower(), []
            else:
                blocks.append((lang, "\n".join(lines)))
                lang = None
        elif lang is not None:
            lines.append(line)
    code = [body for lang, body in blocks if lang in ("", "python", "python3", "py")]
    return code[-1] if code else response


def parse_tests(tests: str | list[str]) -> list[str]:
    """Tests as a list of Python statements (usually `assert ...`). Accepts a list, a JSON-encoded list (record
    metadata travels as strings), or a plain string with one statement per line. Raises ValueError naming what is
    wrong, including a test that does not compile."""
    if isinstance(tests, str):
        if tests.lstrip().startswith("["):
            try:
                tests = json.loads(tests)
            except json.JSONDecodeError as exc:
                raise ValueError(f"tests look like a JSON list but do not parse: {exc}") from None
        else:
            tests = [line for line in tests.splitlines() if line.strip()]
    if not isinstance(tests, list):
        raise ValueError(f"tests must be a list of strings or a string, got {type(tests).__name__}")
    out = []
    for i, test in enumerate(tests):
        if not isinstance(test, str) or not test.strip():
            raise ValueError(f"test {i} must be a non-empty string, got {test!r}")
        try:
            compile(test.strip(), f"<test {i}>", "exec")
        except (SyntaxError, ValueError) as exc:
            raise ValueError(f"test {i} is not valid Python ({exc}): {test!r}") from None
        out.append(test.strip())
    return out


# pid 1 of the new pid namespace, as (namespace) root; $1 is the private directory, the rest the command. The private
# dir becomes a mount of its own first, so it stays writable when the mounts strangers could write to turn
# read-only (only in this mount namespace). pid 1 does not exec the command: when it exits, the kernel kills every
# process left in the namespace, and pid 1 would ignore signals it has no handler for, SIGXCPU included.
_SETUP = """set -e
dir=$1; shift
mount --bind "$dir" "$dir"
for m in / /tmp /var/tmp /dev/shm /run/lock; do ! mountpoint -q "$m" || mount -o remount,bind,ro "$m"; done
cd "$dir"
set +e
"$@"
exit $?
"""

# Runs as the sandbox user. Everything it needs is bound to locals before the code runs, so rebinding os.write or
# the like in the code does not reach the report. Processes the code forks never report (getpid check).
_HARNESS = r"""
import json, os, resource, sys
def main():
    write, exit_, getpid, fd = os.write, os._exit, os.getpid, int(sys.argv[1])
    with open("job.json") as f:
        job = json.load(f)
    os.unlink("job.json")
    nonce, code, tests = job["nonce"], job["code"], job["tests"]
    for which, soft, hard in job["limits"]:
        resource.setrlimit(which, (soft, hard))
    del job
    me = getpid()

    def describe(exc):  # an exception whose __str__ raises (only hostile code has one) ends the run as "crash"
        return (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)[:300]

    def report(passed, reason, detail=""):
        if getpid() == me:
            write(fd, f"{nonce} {passed} {reason} {detail}".replace("\n", " ").encode("utf-8", "replace") + b"\n")
        exit_(0)

    try:
        program = compile(code, "<solution>", "exec")
    except (SyntaxError, ValueError) as exc:
        report(0, "syntax", describe(exc))
    g, failure = {"__name__": "solution"}, None
    try:
        exec(program, g)
    except SystemExit:
        pass  # a script that ends with exit(): its definitions still stand
    except MemoryError:
        failure = ("memory", "MemoryError")
    except BaseException as exc:
        failure = ("crash", describe(exc))
    if failure:
        g.clear()  # free what the code holds, so the report itself can allocate
        report(0, *failure)
    passed, first = 0, ""
    for i, test in enumerate(tests):
        try:
            exec(test, g)
            passed += 1
        except BaseException as exc:
            first = first or f"test {i}: {describe(exc)}"
    report(passed, "ok" if passed == len(tests) else "failed", first)
main()
"""


class Sandbox:
    """Runs code in namespaces as an unprivileged user (see the module docstring); ``run`` is thread-safe."""

    def __init__(self, limits: SandboxLimits = SandboxLimits(), user: str | None = "nobody", *, python: str = ""):
        self.limits = limits
        tools = {name: shutil.which(name, path=_PATH) for name in ("unshare", "setpriv", "mount", "mountpoint")}
        if missing := [name for name, path in tools.items() if path is None]:
            raise SandboxUnavailable(f"the code sandbox needs util-linux tools not found on {_PATH}: {missing}")
        if os.geteuid() == 0:
            if user is None:
                raise SandboxUnavailable("refusing to run untrusted code as root: name an unprivileged user")
            try:
                entry = pwd.getpwnam(user)
            except KeyError:
                raise SandboxUnavailable(f"sandbox user {user!r} does not exist") from None
            self._owner: tuple[int, int] | None = (entry.pw_uid, entry.pw_gid)
            userns, drop = [], ["--reuid", str(entry.pw_uid), "--regid", str(entry.pw_gid), "--clear-groups"]
        else:  # cannot switch users: a user namespace makes the mounts possible; the code runs as us
            self._owner, userns, drop = None, ["--map-root-user"], []
        self._unshare = [tools["unshare"], *userns, "--mount", "--net", "--pid", "--ipc", "--fork", "--kill-child",
                         "--mount-proc", "--", "/bin/sh", "-c", _SETUP, "sh"]
        self._harness = [tools["setpriv"], *drop, "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--",
                         python or sys.executable, "-I", "-S", "-B", "-c", _HARNESS]
        probe = self.run("x = 1", ["assert x == 1"])  # the whole chain, so a broken host fails here, not per sample
        if probe.reason != "ok":
            raise SandboxUnavailable(f"the code sandbox does not work here ({probe.reason}): {probe.detail}")

    def run(self, code: str, tests: list[str]) -> SandboxResult:
        if not tests:
            return SandboxResult(0, 0, "no_tests")
        nonce, workdir = secrets.token_hex(16), tempfile.mkdtemp(prefix="relay_sandbox_")
        read_fd, write_fd = os.pipe()
        try:
            self._prepare(workdir, nonce, code, tests)
            with tempfile.TemporaryFile() as stderr:
                proc = subprocess.Popen(
                    [*self._unshare, workdir, *self._harness, str(write_fd)], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=stderr, pass_fds=(write_fd,), cwd="/", start_new_session=True,
                    env={"PATH": _PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"})
                os.close(write_fd)
                write_fd = -1
                timed_out = _wait_or_kill(proc, self.limits.wall_seconds)
                os.set_blocking(read_fd, False)  # everything is dead: take what is there, never wait for more
                report = b""
                with contextlib.suppress(BlockingIOError):
                    report = os.read(read_fd, 4096)
                stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - _TAIL))
                err = stderr.read().decode("utf-8", "replace").strip()
            if timed_out:
                return SandboxResult(0, len(tests), "timeout", f"killed after {self.limits.wall_seconds} s wall-clock")
            return _parse_report(report, nonce, len(tests)) or _judge_exit(proc.returncode, err, len(tests))
        finally:
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)
            _remove(workdir)

    def _prepare(self, workdir: str, nonce: str, code: str, tests: list[str]) -> None:
        lim = self.limits
        limits = [(resource.RLIMIT_CPU, lim.cpu_seconds, lim.cpu_seconds + 1),
                  (resource.RLIMIT_AS, lim.memory_mb << 20, lim.memory_mb << 20),
                  (resource.RLIMIT_FSIZE, lim.file_size_mb << 20, lim.file_size_mb << 20),
                  (resource.RLIMIT_NPROC, lim.max_processes, lim.max_processes),
                  (resource.RLIMIT_CORE, 0, 0)]
        job = os.path.join(workdir, "job.json")
        with open(job, "w") as f:  # written before the directory changes hands, so nobody can plant a symlink
            json.dump({"nonce": nonce, "code": code, "tests": tests, "limits": limits}, f)
        os.chmod(job, 0o644)  # the directory itself is 0700: only the sandbox user gets in
        if self._owner:
            os.chown(workdir, *self._owner)


def _wait_or_kill(proc: subprocess.Popen, wall_seconds: float) -> bool:
    """Wait for the run; past ``wall_seconds`` SIGKILL its process group and return True. Returns within
    ``wall_seconds + 2 * _GRACE_S`` whatever the code does."""
    try:
        proc.wait(timeout=wall_seconds)
        return False
    except subprocess.TimeoutExpired:
        pass
    # SIGKILL pid 1 of the namespace first: the kernel then kills everything else in it (also what left the process
    # group), and unshare reaps pid 1 only once all of that is gone, so nothing the code started outlives run()
    init = _children(proc.pid)
    for pid in init:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + _GRACE_S
    while init and time.monotonic() < deadline and not _exited(proc.pid):
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):  # the rest of the group; unshare, not yet reaped, holds its id
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=_GRACE_S)
    return True


def _exited(pid: int) -> bool:
    """Whether our child ``pid`` has exited, without reaping it (so its process group id stays ours)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _parse_report(data: bytes, nonce: str, total: int) -> SandboxResult | None:
    """The harness's report, or None unless it is exactly one line with our nonce and sane numbers."""
    if data.count(b"\n") != 1 or not data.endswith(b"\n"):
        return None
    parts = data[:-1].decode("utf-8", "replace").split(" ", 3)
    if len(parts) < 3 or parts[0] != nonce or not parts[1].isdigit() or parts[2] not in REASONS:
        return None
    passed = int(parts[1])
    return SandboxResult(passed, total, parts[2], parts[3] if len(parts) > 3 else "") if passed <= total else None


def _judge_exit(returncode: int, err: str, total: int) -> SandboxResult:
    """Why a run without a valid report ended. sh (pid 1) exits 128+N when the harness dies of signal N."""
    sig = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if sig == signal.SIGXCPU:
        return SandboxResult(0, total, "cpu", "SIGXCPU (RLIMIT_CPU)")
    if sig == signal.SIGKILL:  # the CPU hard limit sends SIGKILL when SIGXCPU was ignored
        return SandboxResult(0, total, "cpu", "SIGKILL (RLIMIT_CPU hard limit, or killed)")
    if "MemoryError" in err:
        return SandboxResult(0, total, "memory", err[-_TAIL:])
    if returncode == 0:
        return SandboxResult(0, total, "output", "exited without a valid report")
    return SandboxResult(0, total, "crash", f"exit status {returncode}: {err}")


def _remove(path: str) -> None:
    if os.geteuid() != 0:  # the code, running as us, may have locked directories; root needs no keys
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        for root, dirs, _ in os.walk(path):
            for name in dirs:
                full = os.path.join(root, name)
                if not os.path.islink(full):
                    with contextlib.suppress(OSError):
                        os.chmod(full, 0o700)
    shutil.rmtree(path, ignore_errors=True)
