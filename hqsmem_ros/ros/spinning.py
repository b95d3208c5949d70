"""Spinning an rclpy executor in a background thread, and stopping it cleanly.

rclpy's Executor.shutdown() destroys the executor's guard condition without waiting for the
handlers that a spinning thread is still running (its wait is skipped once the shutdown flag is
set), and such a handler then fails with "InvalidHandle: cannot use Destroyable because
destruction was requested". So the spinning thread is stopped and joined first: it spins in
short steps and checks a flag between them; only then is the executor shut down.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Optional


class BackgroundSpinner:
    """executor.spin() in a daemon thread; stop() ends it, joins it, then shuts the executor down."""

    STEP_S = 0.05  # how long one spin_once waits for work: the latency of stop()

    def __init__(self, executor, name: str = "hqsmem_spin"):
        self.executor = executor
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._spin, name=name, daemon=True)

    def _spin(self) -> None:
        context = self.executor.context
        while not self._stop.is_set() and context.ok():
            self.executor.spin_once(timeout_sec=self.STEP_S)

    def start(self) -> "BackgroundSpinner":
        self.thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=timeout_s)
        self.executor.shutdown()


def stop_tool(spinner: BackgroundSpinner, node, on_stopped: Optional[Callable[[], None]] = None) -> None:
    """A tool's last step: stop its spinning thread, run `on_stopped` (no callback runs any more),
    then destroy the node and shut ROS down (in that order: rclpy's shutdown races a thread still
    spinning)."""
    import rclpy

    spinner.stop()
    if on_stopped is not None:
        on_stopped()
    node.destroy_node()
    if rclpy.ok():
        rclpy.shutdown()


@contextlib.contextmanager
def tool_spinning(node, executor, on_stopped: Optional[Callable[[], None]] = None) -> Iterator[BackgroundSpinner]:
    """A tool's main loop: `node` spins on `executor` in the background for the with-block, which
    Ctrl-C ends quietly; then `stop_tool` (also after an error, which still propagates)."""
    executor.add_node(node)
    spinner = BackgroundSpinner(executor).start()
    try:
        yield spinner
    except KeyboardInterrupt:
        pass
    finally:
        stop_tool(spinner, node, on_stopped)
