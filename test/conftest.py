"""Test-suite policy: under scripts/test.sh (HQSMEM_NO_SKIPS=1) a skipped test is a failure.

Some tests skip when run by hand in an environment without ROS 2 or the model packages; the
project's test command installs everything, so there a skip would hide a missing part.
"""
import os

import pytest

# Subprocesses the tests start (`python -m hqsmem_ros...`, the venv's `hqsmem` script, spawned
# workers, Ray) import this checkout, not whichever one the venv was installed from.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != ROOT:
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

# The suite's own DDS domain for every test that does not pick one (and the processes they start):
# a robot's topics on this machine (domain 0 or its ROS_DOMAIN_ID) and a second test run at the
# same time never reach its subscriptions (two runs once mixed their synthetic cameras' frames).
# HQSMEM_TEST_DOMAIN_ID chooses it.
os.environ["ROS_DOMAIN_ID"] = os.environ.get("HQSMEM_TEST_DOMAIN_ID") or str(1 + (os.getpid() + 31) % 200)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("HQSMEM_NO_SKIPS") == "1" and report.skipped:
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under scripts/test.sh, where every dependency is installed: {reason}"


class Collector:
    """Shared by the DDS test harnesses: callbacks that store messages, and waiting for a
    condition on them (woken by every message, re-checked at least every 50 ms)."""

    def __init__(self):
        import threading
        self.cv = threading.Condition()

    def _on(self, store):
        def cb(msg):
            with self.cv:
                store.append(msg)
                self.cv.notify_all()
        return cb

    def wait_for(self, predicate, what, timeout=20.0):
        import time
        end = time.monotonic() + timeout
        with self.cv:
            while not predicate():
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}")
                self.cv.wait(min(left, 0.05))


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny model inputs: a second torch thread only adds contention on a shared 2-core machine."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
