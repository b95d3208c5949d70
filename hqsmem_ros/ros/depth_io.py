"""The node's depth side (use_depth): the depth and depth/camera_info callbacks, depth problems
reported without flooding the log, and the ~/points cloud of a result that has 3D.

A mixin of the tracking node (hqsmem_ros.ros.node._Tracking): it uses the node's session,
points_pub and _last_error/_last_error_time; the 3D work itself is the core's (core.depth3d).
"""
from __future__ import annotations

import time

from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header

from hqsmem_ros.core.depth3d import DepthError, pack_points
from hqsmem_ros.ros.depth_msgs import add_depth_msg, pointcloud2_msg, set_camera_info_msg

# A repeated depth problem (the same message) is logged at most this often; /diagnostics shows
# it at WARN while it lasts.
DEPTH_LOG_EVERY_S = 5.0


class DepthIO:
    """Depth in, ~/points out (mixed into the tracking node)."""

    def _on_depth(self, msg: Image) -> None:
        session = self.session
        if session is None or session.depth is None:
            return
        try:
            add_depth_msg(session.depth, msg)  # counted there (pairing.depth_received / bad_depth)
        except DepthError as exc:
            self._depth_problem(f"depth image refused: {exc}")

    def _on_depth_camera_info(self, msg: CameraInfo) -> None:
        session = self.session
        if session is None or session.depth is None:
            return
        try:
            set_camera_info_msg(session.depth, msg)
        except DepthError as exc:
            self._depth_problem(f"depth camera_info refused: {exc}")

    def _depth_problem(self, message: str) -> None:
        """A depth problem: /diagnostics at WARN while it lasts, a log line for each new message
        and at most every DEPTH_LOG_EVERY_S for a repeated one."""
        now = time.monotonic()
        self._last_error, self._last_error_time = message, now
        last, when = self._depth_logged
        if message != last or now - when >= DEPTH_LOG_EVERY_S:
            self._depth_logged = (message, now)
            self.get_logger().warning(f"{message}; 2D results continue (repeated at most every "
                                      f"{DEPTH_LOG_EVERY_S:g} s; counts on /diagnostics, depth.*)")


    def _points_wanted(self) -> bool:
        return (self.points_pub is not None and bool(self.get_parameter("publish_points").value)
                and self.points_pub.get_subscription_count() > 0)


    def _publish_points(self, header, frame3d) -> None:
        if frame3d is not None and frame3d.points is not None and not frame3d.reason:
            # One cloud per result that has 3D (possibly empty); none for a frame without 3D,
            # which says nothing about where obstacles are. In the depth frame, colour stamp.
            cloud = pointcloud2_msg(pack_points(*frame3d.points),
                                    Header(stamp=header.stamp, frame_id=frame3d.frame_id))
            self.points_pub.publish(cloud)
