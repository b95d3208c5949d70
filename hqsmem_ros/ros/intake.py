"""The image subscription's callback group, and which callback signature rclpy offers."""
from __future__ import annotations

import threading

from rclpy.callback_groups import CallbackGroup


class OrderedIntakeGroup(CallbackGroup):
    """Callbacks start one at a time, like a mutually exclusive group, so frames are taken and
    counted in the order they arrived; but a running callback may let the next one start before
    it returns (release()), which the callback that goes on to process its frame does."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._held = False
        self._holder = threading.local()  # rclpy begins, runs and ends a callback in one thread

    def can_execute(self, entity) -> bool:
        with self._lock:
            return not self._held

    def beginning_execution(self, entity) -> bool:
        with self._lock:
            if self._held:
                return False
            self._held = True
        self._holder.holds = True
        return True

    def ending_execution(self, entity) -> None:
        self.release()

    def release(self) -> bool:
        """Let the next callback start; True when this thread held the group."""
        if not getattr(self._holder, "holds", False):
            return False
        self._holder.holds = False
        with self._lock:
            self._held = False
        return True


def takes_message_info() -> bool:
    """rclpy passes MessageInfo (with publication sequence numbers) to two-argument callbacks
    since Iron; Humble calls every callback with the message alone."""
    from rclpy.subscription import Subscription
    return hasattr(Subscription, "CallbackType")


