"""ROS message side of hqsmem_ros.core.depth3d: depth Image / CameraInfo in, PointCloud2 out.

The node (and anything else with rclpy) calls these; all the work is in the ROS-free core.
"""
from __future__ import annotations

import array
from typing import Any, Dict

from sensor_msgs.msg import PointCloud2, PointField

from hqsmem_ros.core.depth3d import Depth3D, DepthImage, Intrinsics


def stamp_seconds(header: Any) -> float:
    return header.stamp.sec + header.stamp.nanosec * 1e-9


def add_depth_msg(d3: Depth3D, msg: Any) -> DepthImage:
    """Hand a sensor_msgs/Image depth frame to the pairer (DepthError for a bad one, counted)."""
    return d3.add_depth(msg.encoding, msg.height, msg.width, msg.step, bool(msg.is_bigendian), msg.data,
                        stamp_seconds(msg.header), msg.header.frame_id)


def set_camera_info_msg(d3: Depth3D, msg: Any) -> Intrinsics:
    """The depth camera's intrinsics from sensor_msgs/CameraInfo (DepthError for a zero focal length)."""
    return d3.set_camera_info(msg.k, msg.width, msg.height)


def pointcloud2_msg(packed: Dict[str, Any], header: Any) -> PointCloud2:
    """sensor_msgs/PointCloud2 from depth3d.pack_points' layout, with the given header."""
    msg = PointCloud2(height=packed["height"], width=packed["width"], is_bigendian=packed["is_bigendian"],
                      point_step=packed["point_step"], row_step=packed["row_step"], is_dense=packed["is_dense"])
    msg.header = header
    msg.fields = [PointField(name=n, offset=o, datatype=t, count=c) for n, o, t, c in packed["fields"]]
    msg.data = array.array("B", packed["data"])  # one memcpy, no per-element check
    return msg
