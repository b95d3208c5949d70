"""Spinning an rclpy executor in a background thread, and stopping it cleanly.

rclpy's Executor.shutdown() destroys the executor's guard condition without waiting for the
handlers that a spinning thread is still running (its wait is skipped once the shutdown flag is
set), and such a handler then fails with "InvalidHandle: cannot use Destroyable because
destruction was requested". So the spinning thread is stopped and joined first: it spins in
short steps and checks a flag between them; then the callbacks it already handed to a
MultiThreadedExecutor's thread pool are waited for (rclpy's MultiThreadedExecutor.shutdown()
destroys that guard condition before it waits for its pool, so a callback queued there failed,
and the Task holding that error printed "The following exception was never retrieved" when
collected); only then is the executor shut down. And rclpy's executors raise InvalidHandle
from the spinning thread when an entity is destroyed while they build their wait set (a
lifecycle deactivate): the spinner goes on instead of dying silently.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import sys
import threading
import traceback
from typing import Callable, Iterator, Optional


class BackgroundSpinner:
    """executor.spin() in a daemon thread; stop() ends it, joins it, then shuts the executor down."""

    STEP_S = 0.05  # how long one spin_once waits for work: the latency of stop()

    def __init__(self, executor, name: str = "hqsmem_spin"):
        self.executor = executor
        self._stop = threading.Event()
        self.invalid_handles = 0  # spins that met an entity destroyed meanwhile (see _spin)
        self.thread = threading.Thread(target=self._spin, name=name, daemon=True)

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        invalid_handle = _invalid_handle_error()
        context = self.executor.context
        try:
            while not self._stop.is_set() and context.ok():
                try:
                    self.executor.spin_once(timeout_sec=self.STEP_S)
                except invalid_handle:
                    # rclpy raises this here when an entity (a subscription's event handler) is
                    # destroyed while the executor builds its wait set (ros2/rclpy#1284), as a
                    # lifecycle deactivate does; the next spin builds one without it.
                    self.invalid_handles += 1
        except ExternalShutdownException:  # the context was shut down from elsewhere: just end
            pass

    def start(self) -> "BackgroundSpinner":
        self.thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=timeout_s)
        self._finish_dispatched_callbacks()
        self.executor.shutdown()

    def _finish_dispatched_callbacks(self) -> None:
        """Wait for the callbacks the last spins handed to a MultiThreadedExecutor's thread pool
        (while the executor's guard condition still exists), then fetch each one's outcome, as
        spin_once would have: an InvalidHandle counts like one in _spin, any other error is
        printed. rclpy has no public call for this: `_executor` (the pool) and `_futures` (the
        dispatched tasks not yet checked) are its MultiThreadedExecutor's, Humble to Kilted."""
        pool = getattr(self.executor, "_executor", None)
        if not isinstance(pool, concurrent.futures.ThreadPoolExecutor):
            return  # a SingleThreadedExecutor runs its callbacks inside spin_once: none is left
        pool.shutdown(wait=True)
        invalid_handle = _invalid_handle_error()
        for task in list(getattr(self.executor, "_futures", ())):
            error = task.exception() if task.done() else None
            if isinstance(error, invalid_handle):
                self.invalid_handles += 1
            elif error is not None:
                print("hqsmem: a callback failed while its executor stopped:", file=sys.stderr)
                traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)


def _invalid_handle_error() -> type:
    """rclpy's InvalidHandle (in rclpy.exceptions from Iron on; the C extension's on Humble)."""
    import rclpy.exceptions

    handle_error = getattr(rclpy.exceptions, "InvalidHandle", None)
    if handle_error is None:
        from rclpy.impl.implementation_singleton import rclpy_implementation
        handle_error = rclpy_implementation.InvalidHandle
    return handle_error


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
    Ctrl-C or SIGTERM ends quietly (ROS initialised with init_without_ros_signal_handlers, so
    that rclpy's signal thread does not race the teardown); then `stop_tool` (also after an error, which still propagates)."""
    executor.add_node(node)
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM (launch's escalation) as Ctrl-C
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    spinner = BackgroundSpinner(executor).start()
    try:
        yield spinner
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        stop_tool(spinner, node, on_stopped)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def init_without_ros_signal_handlers(args) -> None:
    """rclpy.init() for a process that stops on SIGINT/SIGTERM itself (spin_until_signal).
    rclpy's own handlers shut the contexts down from a thread of theirs, which raced the main
    thread's rclpy.shutdown() and crashed the process at exit now and then (SIGSEGV in
    uninstall_signal_handlers, seen once in 25 stops of `hqsmem node --lifecycle`)."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An Event that SIGINT and SIGTERM set while the with-block runs (in the main thread; a
    signal handler can be installed only there). A process enters it before it builds its node,
    so that a signal during start-up (models loading) stops it cleanly too, instead of Python's
    default SIGTERM handler killing it."""
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def spin_until_signal(node, num_threads: int = 6, before_stop=None,
                      stop: Optional[threading.Event] = None) -> None:
    """Spin `node` on a MultiThreadedExecutor in a background thread until `stop` is set (by
    default: SIGINT or SIGTERM while it spins, see stop_on_signals) or the context is shut down
    from elsewhere; then `before_stop()` (e.g. wake callbacks that wait), stop and join the
    spinning thread, and shut the executor down, so that no callback runs while the node is
    destroyed afterwards. The main thread waits in short steps: a Python signal handler runs
    only between bytecodes."""
    if stop is None:
        with stop_on_signals() as stop_requested:
            return spin_until_signal(node, num_threads, before_stop, stop_requested)
    from rclpy.executors import MultiThreadedExecutor

    executor = MultiThreadedExecutor(num_threads=num_threads, context=node.context)
    executor.add_node(node)
    spinner = BackgroundSpinner(executor).start()
    try:
        while not stop.wait(0.1) and spinner.thread.is_alive():
            pass
    finally:
        if before_stop is not None:
            before_stop()
        spinner.stop(timeout_s=60.0)
