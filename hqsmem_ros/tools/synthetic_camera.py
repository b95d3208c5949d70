"""A camera node that publishes a synthetic sequence (hqsmem_ros.data.synth) on `image`.

It can also write the sequence's ground truth (out_dir/labels/*.png named by frame, the first one
usable as the tracking node's initial_mask) and every frame's stamp (out_dir/stamps.csv), so the tracker's
output can be scored against the truth. With `lockstep`, each frame is published only after the
tracker's result for the previous one arrived (or `lockstep_timeout` passed): a run is then
deterministic and drops nothing, whatever the machine's speed.

  python -m hqsmem_ros.tools.synthetic_camera --ros-args -p frames:=150 -p out_dir:=out/gt
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from hqsmem_ros.data.synth import make_sequence
from hqsmem_ros.io import image_codec
from hqsmem_ros.ros.spinning import init_without_ros_signal_handlers, tool_spinning


class SyntheticCamera(Node):
    def __init__(self, **kwargs):
        super().__init__("synthetic_camera", **kwargs)
        p = {
            "sequence": "demo", "seed": 0, "width": 640, "height": 480, "frames": 150,
            "n_objects": 3, "rate": 30.0, "encoding": "bgr8", "compressed": False,
            "frame_id": "camera", "out_dir": "", "lockstep": False,
            "results_topic": "/hqsmem_node/objects", "lockstep_timeout": 10.0,
            "wait_for_subscribers": 1, "reliable": True, "start_stamp": 1000.0,
            "wait_for_topic": "",  # e.g. a recorder's topic: start once it has a subscriber
        }
        for name, default in p.items():
            self.declare_parameter(name, default)
        g = lambda name: self.get_parameter(name).value  # noqa: E731
        self.frames, self.labels = make_sequence(g("sequence"), int(g("seed")), (int(g("width")), int(g("height"))),
                                                 int(g("frames")), int(g("n_objects")))
        self.rate = float(g("rate"))
        self.encoding = g("encoding")
        self.compressed = bool(g("compressed"))
        self.frame_id = g("frame_id")
        self.start_stamp = float(g("start_stamp"))
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE if g("reliable")
                         else ReliabilityPolicy.BEST_EFFORT)
        self.pub = (self.create_publisher(CompressedImage, "image/compressed", qos) if self.compressed
                    else self.create_publisher(Image, "image", qos))
        self.lockstep = bool(g("lockstep"))
        self.lockstep_timeout = float(g("lockstep_timeout"))
        self._results_seen = set()
        self._result_cv = threading.Condition()
        if self.lockstep:
            from hqsmem_ros.msg import TrackedObjectArray
            self.create_subscription(TrackedObjectArray, g("results_topic"), self._on_result, 10)
        self.out_dir = Path(g("out_dir")) if g("out_dir") else None
        self.wait_for_subscribers = int(g("wait_for_subscribers"))

    def stamp_of(self, k: int) -> float:
        return self.start_stamp + k / self.rate

    def write_truth(self) -> None:
        write_truth(self.out_dir, self.labels, [self.stamp_of(k) for k in range(len(self.frames))])

    def _on_result(self, msg) -> None:
        with self._result_cv:
            self._results_seen.add(msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec)
            self._result_cv.notify_all()

    def message(self, k: int):
        rgb = self.frames[k]
        if self.compressed:
            msg = CompressedImage(format="png" if self.encoding == "png" else "jpeg",
                                  data=image_codec.encode_compressed(rgb, "png" if self.encoding == "png" else "jpeg"))
        else:
            pixels = rgb[..., ::-1].copy() if self.encoding == "bgr8" else rgb
            msg = image_codec.fill_image_msg(Image(), image_codec.encode_image(pixels, self.encoding))
        ns = _to_ns(self.stamp_of(k))
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(ns, 1_000_000_000)
        msg.header.frame_id = self.frame_id
        return msg

    def run(self) -> int:
        """Publish every frame (call while an executor spins this node in another thread)."""
        if self.out_dir is not None:
            self.write_truth()
        end = time.monotonic() + 30
        while self.pub.get_subscription_count() < self.wait_for_subscribers and time.monotonic() < end:
            time.sleep(0.05)
        wait_topic = self.get_parameter("wait_for_topic").value
        while wait_topic and self.count_subscribers(wait_topic) == 0 and time.monotonic() < end:
            time.sleep(0.05)
        if self.lockstep:  # the result subscription must be matched too, or the first wait times out
            while self.count_publishers(self.get_parameter("results_topic").value) == 0 and time.monotonic() < end:
                time.sleep(0.05)
        period = 1.0 / self.rate
        next_time = time.monotonic()
        waited_out = 0
        for k in range(len(self.frames)):
            if not self.lockstep:
                next_time += period
                time.sleep(max(0.0, next_time - time.monotonic()))
            self.pub.publish(self.message(k))
            if self.lockstep:
                ns = _to_ns(self.stamp_of(k))
                with self._result_cv:
                    if not self._result_cv.wait_for(lambda: ns in self._results_seen, self.lockstep_timeout):
                        waited_out += 1
        self.get_logger().info(f"published {len(self.frames)} frames"
                               + (f" ({waited_out} without a result in time)" if waited_out else ""))
        return len(self.frames)


def write_truth(out_dir, labels, stamps) -> None:
    """labels/00000.png... (pixel = object id) and stamps.csv (frame, stamp_ns) in out_dir."""
    from PIL import Image as PILImage
    out_dir = Path(out_dir)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    for k, lab in enumerate(labels):
        PILImage.fromarray(lab.astype(np.uint8)).save(out_dir / "labels" / f"{k:05d}.png")
    with open(out_dir / "stamps.csv", "w", encoding="utf-8") as f:
        f.write("frame,stamp_ns\n")
        for k, stamp in enumerate(stamps):
            f.write(f"{k},{_to_ns(stamp)}\n")


def _to_ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def main(argv: Optional[List[str]] = None) -> int:
    from hqsmem_ros.ros import dds_transport
    dds_transport.apply()  # large frames between processes (config/fastdds.xml), before rclpy.init
    init_without_ros_signal_handlers(sys.argv if argv is None else argv)
    node = SyntheticCamera()
    with tool_spinning(node, MultiThreadedExecutor(num_threads=2)):
        try:
            node.run()
            time.sleep(0.5)  # let the last messages leave before the process ends
        except Exception:
            if rclpy.ok():
                raise  # a real error; otherwise we were interrupted while publishing
    return 0


if __name__ == "__main__":
    sys.exit(main())
