"""Stopping a background-spinning executor while callbacks are still firing (real rclpy)."""
import os
import threading

import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 not installed: run scripts/setup_ros.sh")
from rclpy.context import Context  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402

from hqsmem_ros.ros.spinning import BackgroundSpinner  # noqa: E402

DOMAIN_ID = 1 + (os.getpid() + 77) % 200


def test_stop_while_busy_ends_the_thread_without_errors(monkeypatch):
    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    for _ in range(30):  # rclpy's own shutdown lost this race about once in 30 rounds here
        ctx = Context()
        rclpy.init(context=ctx, domain_id=DOMAIN_ID)
        node = rclpy.create_node("spin_test", context=ctx)
        fired = threading.Event()
        node.create_timer(0.001, fired.set)  # work in flight when stop() comes
        executor = MultiThreadedExecutor(num_threads=2, context=ctx)
        executor.add_node(node)
        spinner = BackgroundSpinner(executor).start()
        assert fired.wait(5.0), "the executor never ran the timer"
        spinner.stop()
        assert not spinner.thread.is_alive()
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    assert errors == []
