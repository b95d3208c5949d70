"""An RGB-D camera node publishing the synthetic RGB-D scene (hqsmem_ros.data.synth_rgbd).

Publishes, with the same stamps (unless told otherwise, for testing pairing):
  image              sensor_msgs/Image (bgr8 or rgb8)
  camera_info        sensor_msgs/CameraInfo of the colour image
  depth              sensor_msgs/Image, 16UC1 millimetres or 32FC1 metres, registered to `image`
  depth/camera_info  sensor_msgs/CameraInfo of the depth image (the same intrinsics: aligned)

`depth_stamp_offset` shifts the depth stamps (seconds), `drop_depth_every` N leaves out every
N-th depth frame (frames N-1, 2N-1, ...), `depth_stop_after` K publishes depth only for the first
K frames (a depth stream that stops). With `out_dir` it writes labels/*.png, stamps.csv and
truth3d.csv (frame, stamp_ns, id, distance, centre x y z, box min x y z, box max x y z, visible
pixels; metres, camera optical frame).

  python -m hqsmem_ros.tools.synthetic_rgbd_camera --ros-args -p frames:=150 -p depth_encoding:=32FC1
"""
from __future__ import annotations

import array
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image

from hqsmem_ros.data.synth_rgbd import Truth3D, intrinsics, make_rgbd
from hqsmem_ros.ros.spinning import init_without_ros_signal_handlers, tool_spinning

DEPTH_ENCODINGS = ("16UC1", "32FC1")


def _to_ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def _stamp(msg, seconds: float) -> None:
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(_to_ns(seconds), 1_000_000_000)


def _image(pixels: np.ndarray, encoding: str, frame_id: str, stamp: float) -> Image:
    pixels = np.ascontiguousarray(pixels)
    msg = Image(encoding=encoding, height=int(pixels.shape[0]), width=int(pixels.shape[1]),
                is_bigendian=sys.byteorder == "big")
    msg.step = int(pixels.strides[0])
    msg.data = array.array("B", pixels.tobytes())  # host byte order, flagged in is_bigendian
    msg.header.frame_id = frame_id
    _stamp(msg, stamp)
    return msg


def camera_info_msg(width: int, height: int, frame_id: str, stamp: float) -> CameraInfo:
    intr = intrinsics(width, height)
    msg = CameraInfo(width=width, height=height, distortion_model="plumb_bob")
    msg.d = [0.0] * 5
    msg.k = [intr.fx, 0.0, intr.cx, 0.0, intr.fy, intr.cy, 0.0, 0.0, 1.0]
    msg.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    msg.p = [intr.fx, 0.0, intr.cx, 0.0, 0.0, intr.fy, intr.cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    msg.header.frame_id = frame_id
    _stamp(msg, stamp)
    return msg


class SyntheticRGBDCamera(Node):
    def __init__(self, **kwargs):
        super().__init__("synthetic_rgbd_camera", **kwargs)
        p = {"seed": 0, "width": 640, "height": 480, "frames": 90, "n_objects": 3, "rate": 30.0,
             "encoding": "bgr8", "depth_encoding": "16UC1", "frame_id": "camera_color_optical_frame",
             "start_stamp": 1000.0, "depth_stamp_offset": 0.0, "drop_depth_every": 0, "depth_stop_after": -1,
             "wait_for_subscribers": 1, "reliable": True, "out_dir": ""}
        for name, default in p.items():
            self.declare_parameter(name, default)
        g = lambda name: self.get_parameter(name).value  # noqa: E731
        if g("depth_encoding") not in DEPTH_ENCODINGS:
            raise ValueError(f"depth_encoding must be one of {', '.join(DEPTH_ENCODINGS)}, got {g('depth_encoding')!r}")
        if g("encoding") not in ("bgr8", "rgb8"):
            raise ValueError(f"encoding must be bgr8 or rgb8, got {g('encoding')!r}")
        self.size = (int(g("width")), int(g("height")))
        self.data = make_rgbd(int(g("seed")), self.size, int(g("frames")), int(g("n_objects")))
        self.rate, self.start_stamp = float(g("rate")), float(g("start_stamp"))
        self.encoding, self.depth_encoding, self.frame_id = g("encoding"), g("depth_encoding"), g("frame_id")
        self.depth_offset = float(g("depth_stamp_offset"))
        self.drop_every, self.stop_after = int(g("drop_depth_every")), int(g("depth_stop_after"))
        self.wait_for_subscribers = int(g("wait_for_subscribers"))
        self.out_dir = Path(g("out_dir")) if g("out_dir") else None
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE if g("reliable")
                         else ReliabilityPolicy.BEST_EFFORT)
        self.pub_image = self.create_publisher(Image, "image", qos)
        self.pub_info = self.create_publisher(CameraInfo, "camera_info", qos)
        self.pub_depth = self.create_publisher(Image, "depth", qos)
        self.pub_depth_info = self.create_publisher(CameraInfo, "depth/camera_info", qos)
        self.depth_published: List[int] = []

    def stamp_of(self, k: int) -> float:
        return self.start_stamp + k / self.rate

    def truth(self, k: int) -> Dict[int, Truth3D]:
        return self.data[k].truth

    def publishes_depth(self, k: int) -> bool:
        if 0 <= self.stop_after <= k:
            return False
        return not (self.drop_every > 0 and (k + 1) % self.drop_every == 0)

    def messages(self, k: int) -> Tuple[Image, CameraInfo, Optional[Image], Optional[CameraInfo]]:
        f = self.data[k]
        t = self.stamp_of(k)
        rgb = f.rgb[..., ::-1] if self.encoding == "bgr8" else f.rgb
        image = _image(rgb, self.encoding, self.frame_id, t)
        info = camera_info_msg(*self.size, self.frame_id, t)
        if not self.publishes_depth(k):
            return image, info, None, None
        td = t + self.depth_offset
        depth = _image(f.depth_mm if self.depth_encoding == "16UC1" else f.depth_m, self.depth_encoding,
                       self.frame_id, td)
        return image, info, depth, camera_info_msg(*self.size, self.frame_id, td)

    def write_truth(self) -> None:
        from PIL import Image as PILImage
        out = self.out_dir
        (out / "labels").mkdir(parents=True, exist_ok=True)
        with open(out / "stamps.csv", "w", encoding="utf-8") as s, open(out / "truth3d.csv", "w", encoding="utf-8") as t3:
            s.write("frame,stamp_ns\n")
            t3.write("frame,stamp_ns,id,distance,cx,cy,cz,min_x,min_y,min_z,max_x,max_y,max_z,visible_pixels\n")
            for k, f in enumerate(self.data):
                PILImage.fromarray(f.label).save(out / "labels" / f"{k:05d}.png")
                ns = _to_ns(self.stamp_of(k))
                s.write(f"{k},{ns}\n")
                for oid, tr in sorted(f.truth.items()):
                    vals = (tr.distance, *tr.centre, *tr.box_min, *tr.box_max)
                    t3.write(f"{k},{ns},{oid}," + ",".join(f"{v:.6f}" for v in vals) + f",{tr.visible_pixels}\n")

    def run(self) -> int:
        """Publish every frame at `rate` (call while an executor spins this node)."""
        if self.out_dir is not None:
            self.write_truth()
        end = time.monotonic() + 30
        pubs = (self.pub_image, self.pub_depth, self.pub_depth_info)  # camera_info (colour) is optional
        while min(p.get_subscription_count() for p in pubs) < self.wait_for_subscribers and time.monotonic() < end:
            time.sleep(0.05)
        next_time = time.monotonic()
        for k in range(len(self.data)):
            next_time += 1.0 / self.rate
            time.sleep(max(0.0, next_time - time.monotonic()))
            image, info, depth, depth_info = self.messages(k)
            if depth is not None:  # depth first: a live pairer then finds it when the colour frame lands
                self.pub_depth_info.publish(depth_info)
                self.pub_depth.publish(depth)
                self.depth_published.append(k)
            self.pub_info.publish(info)
            self.pub_image.publish(image)
        self.get_logger().info(f"published {len(self.data)} colour frames, {len(self.depth_published)} depth frames")
        return len(self.data)


def main(argv: Optional[List[str]] = None) -> int:
    init_without_ros_signal_handlers(sys.argv if argv is None else argv)
    try:
        node = SyntheticRGBDCamera()
    except ValueError as exc:
        print(f"synthetic_rgbd_camera: {exc}", file=sys.stderr)
        rclpy.shutdown()
        return 2
    with tool_spinning(node, MultiThreadedExecutor(num_threads=2)):
        node.run()
        time.sleep(0.5)  # let the last messages leave before the process ends
    return 0


if __name__ == "__main__":
    sys.exit(main())
