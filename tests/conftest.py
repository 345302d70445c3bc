"""Suite-wide: end the test process with pytest's own exit status.

The suite runs vLLM engines, Ray drivers and gloo process groups in this process. Once (2026-12-05) the
process died with SIGSEGV during interpreter shutdown after pytest had reported every test passed (993
passed, 7 skipped): a native destructor at exit, not a test. Leaving with ``os._exit`` after pytest has
finished and printed its summary skips those destructors; a failing, erroring or crashing test still sets
the status (a crash during a test is reported by pytest's faulthandler as before)."""

from __future__ import annotations

import os
import sys

_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _status.append(int(exitstatus))


def pytest_unconfigure(config):
    if _status and not hasattr(config, "workerinput"):  # the main process (not an xdist worker)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_status[0])
