"""`hqsmem_node --lifecycle`: the tracking node as an rclpy LifecycleNode, unconfigured at
start and driven through ~/change_state.

Its transitions call the steps every tracking node has (hqsmem_ros.ros.node._Tracking):
configure (models, session, publishers), activate (subscriptions, services, diagnostics timer),
deactivate (those removed, the models kept), cleanup (the models freed).
"""
from __future__ import annotations

import time

from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import TransitionCallbackReturn

from hqsmem_ros.ros.node import _Tracking


class HQSMemLifecycleNode(_Tracking, LifecycleNode):
    """`hqsmem_node --lifecycle`: unconfigured at start; ~/change_state drives it (module
    docstring). A failed configure (a missing checkpoint, CUDA asked for on a machine
    without it, a bad parameter) answers FAILURE with the reason logged and stays
    unconfigured."""

    def on_configure(self, state):
        try:
            self._configure()
        except Exception as exc:  # any model/config error: refuse the transition, say why
            self.get_logger().error(f"configure failed: {type(exc).__name__}: {exc}")
            self._last_error, self._last_error_time = f"configure failed: {exc}", time.monotonic()
            self._cleanup()
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info("configured: models loaded")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state):
        self._activate()
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state):
        self._deactivate("deactivated")
        self.get_logger().info("deactivated: subscriptions and services removed, models kept")
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state):
        self._cleanup()
        self.get_logger().info("cleaned up: models freed")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state):
        if self._active_entities:
            self._deactivate("shutdown")
        if self.pipeline is not None:
            self._cleanup()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state):
        return self.on_shutdown(state)
