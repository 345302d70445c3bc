"""The code sandbox on real subprocesses: right code scores, hostile code is contained and scores 0.

Every run is bounded (``run`` asserts it returns within BOUND_S). The tests that check the switch to ``nobody``
skip when this process is not root; CI runs as root, and there a sandbox that cannot be built fails the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from reward_service.sandbox import (
    REASONS,
    Sandbox,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    extract_code,
    parse_tests,
)

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="checks the switch to user 'nobody', which only root can make")
LIMITS = SandboxLimits(cpu_seconds=1, wall_seconds=3.0, memory_mb=128)
BOUND_S = 10.0


def _sandbox(limits: SandboxLimits) -> Sandbox:
    try:
        return Sandbox(limits)
    except SandboxUnavailable as exc:
        if ROOT:
            raise  # CI runs as root: there a sandbox that cannot be built is a failure, not a skip
        pytest.skip(f"no code sandbox for a non-root user here: {exc}")


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return _sandbox(LIMITS)


@pytest.fixture(scope="module")
def quick() -> Sandbox:
    """A one-second wall clock, for the runs that must be killed."""
    return _sandbox(SandboxLimits(cpu_seconds=1, wall_seconds=1.0, memory_mb=128))


def run(sandbox: Sandbox, code: str, tests: list[str]) -> SandboxResult:
    start = time.monotonic()
    result = sandbox.run(code, tests)
    assert time.monotonic() - start < BOUND_S, result
    assert result.reason in REASONS
    return result


def nobody_processes() -> str:
    return subprocess.run(["pgrep", "-a", "-u", "nobody"], capture_output=True, text=True, timeout=10).stdout


# --- parsing, no subprocess -----------------------------------------------------------------------------------


def test_extract_code_takes_the_last_python_or_plain_fence():
    assert extract_code("def f(): return 1") == "def f(): return 1"
    fenced = "Here:\n```python\ndef f():\n    return 1\n```\nDone."
    assert extract_code(fenced) == "def f():\n    return 1"
    assert extract_code("```\nx = 1\n```\nthen\n```Python\nx = 2\n```") == "x = 2"
    assert extract_code("```python\nx = 1\n```\n```bash\nls\n```\nsome text") == "x = 1"  # not the bash block


def test_parse_tests_accepts_list_json_and_lines():
    assert parse_tests(["assert f(1) == 2", "assert f(2) == 3"]) == ["assert f(1) == 2", "assert f(2) == 3"]
    assert parse_tests(json.dumps(["assert f(1) == 2"])) == ["assert f(1) == 2"]
    assert parse_tests("assert f(1) == 2\n\n  assert f(2) == 3\n") == ["assert f(1) == 2", "assert f(2) == 3"]
    assert parse_tests([]) == []


@pytest.mark.parametrize(
    ("tests", "message"),
    [
        ('["assert 1",', "JSON"),
        ("[1, 2]", "test 0"),
        (["assert 1", ""], "test 1"),
        (["assert f(1) =="], "not valid Python"),
        ({"a": 1}, "dict"),
    ],
)
def test_parse_tests_names_what_is_wrong(tests, message):
    with pytest.raises(ValueError, match=message):
        parse_tests(tests)


def test_result_fraction_and_limit_validation():
    assert SandboxResult(1, 4, "failed").fraction == 0.25
    assert SandboxResult(0, 0, "no_tests").fraction == 0.0
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=0)


# --- scoring ----------------------------------------------------------------------------------------------------

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(10, 1) == 11", "assert add(7, 7) == 14"]


def test_correct_code_passes_every_test(sandbox):
    result = run(sandbox, extract_code("```python\ndef add(a, b):\n    return a + b\n```"), ADD_TESTS)
    assert (result.passed, result.total, result.reason, result.fraction) == (4, 4, "ok", 1.0)


def test_half_correct_code_scores_half(sandbox):
    result = run(sandbox, "def add(a, b):\n    return a + b if a < 5 else 0", ADD_TESTS)
    assert (result.fraction, result.reason) == (0.5, "failed")
    assert result.detail.startswith("test 2: AssertionError")


def test_syntax_error_and_no_tests(sandbox):
    result = run(sandbox, "def add(a, b:\n    return a + b", ADD_TESTS)
    assert (result.fraction, result.reason) == (0.0, "syntax")
    assert sandbox.run("def add(a, b): return a + b", []) == SandboxResult(0, 0, "no_tests")


def test_forged_report_lines_do_not_score(sandbox):
    code = "import os\nprint('0 1 ok')\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0 1 ok\\n')\n" \
           "    except OSError:\n        pass"
    assert run(sandbox, code, ["assert False"]).fraction == 0.0  # the extra line voids the report: "output"
    assert run(sandbox, "import os\nos._exit(0)", ["assert True"]) == SandboxResult(
        0, 1, "output", "exited without a valid report")


# --- containment ------------------------------------------------------------------------------------------------


def test_runs_unprivileged_in_a_private_directory_that_is_removed(sandbox):
    checks = ["assert os.getpid() != 1", "assert os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR']",
              "assert os.stat('.').st_mode & 0o777 == 0o700", "assert False, os.getcwd()"]
    if ROOT:
        checks[:0] = ["assert os.getuid() == os.stat('.').st_uid == 65534", "assert os.getgroups() == []"]
    result = run(sandbox, "import os", checks)
    assert (result.passed, result.total) == (len(checks) - 1, len(checks)), result.detail
    workdir = result.detail.rpartition("AssertionError: ")[2]
    assert Path(workdir).name.startswith("relay_sandbox_")
    assert not os.path.exists(workdir)


@pytest.mark.parametrize(
    "code",
    ["while True:\n    pass", "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass"],
    ids=["busy_loop", "ignores_SIGXCPU"],  # the second meets the hard limit (SIGKILL) or the wall clock
)
def test_infinite_loop_is_stopped(sandbox, code):
    result = run(sandbox, code, ["assert True"])
    assert (result.fraction, result.reason in ("cpu", "timeout")) == (0.0, True), result


def test_sleeping_code_times_out_on_the_wall_clock(quick):
    result = run(quick, "import time\ntime.sleep(60)", ["assert True"])
    assert (result.fraction, result.reason) == (0.0, "timeout")


@needs_root
@pytest.mark.parametrize(
    "code",
    [
        "import os\nwhile True:\n    os.fork()",
        # children that leave the process group, then the parent hangs: the wall clock kills the namespace
        "import os, time\nfor _ in range(5):\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(60)\n"
        "time.sleep(60)",
    ],
    ids=["fork_bomb", "escaped_sleepers"],
)
def test_forking_code_is_contained_and_leaves_no_process(quick, code):
    assert nobody_processes() == "", "a process of 'nobody' was running before the test"
    result = run(quick, code, ["assert True"])
    assert result.fraction == 0.0 and result.reason in ("crash", "timeout"), result
    assert nobody_processes() == ""


@pytest.mark.parametrize("code", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(bytearray(10**6))"],
                         ids=["at_once", "gradual"])
def test_memory_beyond_the_limit_scores_zero(sandbox, code):
    result = run(sandbox, code, ["assert True"])
    assert result.fraction == 0.0 and result.reason in ("memory", "crash"), result


def test_no_network_not_even_loopback(sandbox):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        code = f"import socket\ndef connect():\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n" \
               "    return 'connected'"
        result = run(sandbox, code, ["assert connect() == 'connected'"])
        assert (result.fraction, result.reason) == (0.0, "failed")
        assert "OSError" in result.detail, result.detail  # it raised inside: "Network is unreachable"
        result = run(sandbox, f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)", ["1"])
        assert (result.fraction, result.reason) == (0.0, "crash")
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody ever knocked


def test_writes_outside_the_private_directory_fail(sandbox):
    token = uuid.uuid4().hex
    outside = [f"/tmp/relay_sandbox_escape_{token}", str(Path(__file__).parent / f"escape_{token}")]
    code = "import os\ndef write(path, size=1):\n    try:\n        with open(path, 'wb') as f:\n" \
           "            f.write(b'x' * size)\n        return 'written'\n    except OSError as exc:\n" \
           "        return type(exc).__name__"
    tests = [f"assert write({path!r}) != 'written'" for path in outside] + [
        "assert write('big.bin', 2 << 20) != 'written'", "assert os.path.getsize('big.bin') <= 1 << 20",
        "assert write('small.bin') == 'written'"]  # the private directory itself is writable
    try:
        result = run(sandbox, code, tests)
        assert (result.fraction, result.reason) == (1.0, "ok"), result.detail
        assert not any(os.path.exists(path) for path in outside)
    finally:  # should a write get through, do not leave it behind
        for path in outside:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def test_concurrent_runs_from_a_thread_pool(sandbox):
    jobs = [(f"def f():\n    return {i}", [f"assert f() == {i}"] + ["assert f() == -1"] * (i % 2)) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: run(sandbox, *job), jobs))
    assert [r.fraction for r in results] == [1.0, 0.5, 1.0, 0.5]
    assert [r.reason for r in results] == ["ok", "failed", "ok", "failed"]
