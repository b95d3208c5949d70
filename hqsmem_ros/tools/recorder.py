"""Records the tracking node's outputs: a rosbag2 file (mcap or sqlite3), an overlay video and,
optionally, the label images as PNGs named by stamp (for scoring).

Messages are taken off DDS serialized (rclpy raw subscriptions) and written to the bag as they
came, with the `rosbags` library, so the bag is what `ros2 bag record` would have written; no
ROS bag tooling is needed on this machine.

  python -m hqsmem_ros.tools.recorder --ros-args -p bag:=out/run -p video:=out/overlay.mp4
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import Image

from hqsmem_ros.msg import TrackedObjectArray
from hqsmem_ros.io import image_codec
from hqsmem_ros.ros.spinning import init_without_ros_signal_handlers, tool_spinning

_MSG_DIR_CANDIDATES = (Path(__file__).resolve().parents[2] / "msg",)


def _interface_dir() -> Path:
    """hqsmem_ros's .msg files: the installed share/ (colcon) or the source tree."""
    try:
        from ament_index_python.packages import get_package_share_directory
        share = Path(get_package_share_directory("hqsmem_ros")) / "msg"
        if share.is_dir():
            return share
    except Exception:
        pass
    for d in _MSG_DIR_CANDIDATES:
        if d.is_dir():
            return d
    raise FileNotFoundError("hqsmem_ros msg/ definitions not found (installed share/ or source tree)")


def make_typestore():
    """A rosbags typestore with the ROS 2 standard types plus hqsmem_ros's messages."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore
    store = get_typestore(Stores.ROS2_HUMBLE)
    types = {}
    for path in sorted(_interface_dir().glob("*.msg")):
        types.update(get_types_from_msg(path.read_text(encoding="utf-8"), f"hqsmem_ros/msg/{path.stem}"))
    store.register(types)
    return store


class Recorder(Node):
    def __init__(self, **kwargs):
        super().__init__("hqsmem_recorder", **kwargs)
        for name, default in {"bag": "", "storage": "mcap", "video": "", "fps": 30.0,
                              "labels_dir": "", "node": "/hqsmem_node", "frames": 0,
                              "idle_timeout": 0.0}.items():
            self.declare_parameter(name, default)
        g = lambda n: self.get_parameter(n).value  # noqa: E731
        node = g("node").rstrip("/")
        self.topics = {f"{node}/masks": ("sensor_msgs/msg/Image", Image),
                       f"{node}/objects": ("hqsmem_ros/msg/TrackedObjectArray", TrackedObjectArray),
                       f"{node}/overlay": ("sensor_msgs/msg/Image", Image)}
        self.expected_frames = int(g("frames"))
        self.idle_timeout = float(g("idle_timeout"))
        self.labels_dir = Path(g("labels_dir")) if g("labels_dir") else None
        if self.labels_dir:
            self.labels_dir.mkdir(parents=True, exist_ok=True)
        self.video_path = g("video")
        self.fps = float(g("fps"))
        self._video = None
        self._lock = threading.Lock()
        self.counts: Dict[str, int] = {t: 0 for t in self.topics}
        self.last_message = None
        self.done = threading.Event()
        self.writer = None
        if g("bag"):
            from rosbags.rosbag2 import StoragePlugin, Writer
            storage = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}.get(g("storage"))
            if storage is None:
                raise ValueError(f"storage must be mcap or sqlite3, got {g('storage')!r}")
            bag = Path(g("bag"))
            if bag.exists():
                raise FileExistsError(f"bag {bag} exists already; remove it or choose another path")
            bag.parent.mkdir(parents=True, exist_ok=True)
            self.writer = Writer(bag, version=8, storage_plugin=storage)
            self.writer.open()
            store = make_typestore()
            self.connections = {t: self.writer.add_connection(t, msgtype, typestore=store)
                                for t, (msgtype, _) in self.topics.items()}
        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        for topic, (_, cls) in self.topics.items():
            self.create_subscription(cls, topic, lambda data, t=topic: self._on_raw(t, data), qos, raw=True)

    def _on_raw(self, topic: str, data: bytes) -> None:
        now = time.time_ns()
        cls = self.topics[topic][1]
        msg = None
        if topic.endswith("/masks") or topic.endswith("/overlay") or self.writer is None:
            msg = deserialize_message(data, cls)
        with self._lock:
            self.last_message = time.monotonic()
            stamp_ns = now
            if msg is not None:
                stamp_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            if self.writer is not None:
                # Bag time = receive time, as ros2 bag record does; the header keeps the camera stamp.
                self.writer.write(self.connections[topic], now, data)
            self.counts[topic] += 1
            if topic.endswith("/masks") and self.labels_dir is not None:
                self._write_label(msg, stamp_ns)
            if topic.endswith("/overlay") and self.video_path:
                self._write_video(msg)
            if self.expected_frames and self.counts[next(t for t in self.topics if t.endswith("/masks"))] >= self.expected_frames:
                self.done.set()

    def _write_label(self, msg: Image, stamp_ns: int) -> None:
        import cv2
        label = image_codec.mask_from_msg(msg)
        cv2.imwrite(str(self.labels_dir / f"{stamp_ns}.png"), label.astype(np.uint16))

    def _write_video(self, msg: Image) -> None:
        import cv2
        rgb = image_codec.image_to_rgb(msg)
        if self._video is None:
            Path(self.video_path).parent.mkdir(parents=True, exist_ok=True)
            self._video = cv2.VideoWriter(str(self.video_path), cv2.VideoWriter_fourcc(*"mp4v"),
                                          self.fps, (rgb.shape[1], rgb.shape[0]))
            if not self._video.isOpened():
                raise RuntimeError(f"cannot open video writer for {self.video_path}")
        self._video.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        with self._lock:
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            if self._video is not None:
                self._video.release()
                self._video = None


def main(argv: Optional[List[str]] = None) -> int:
    from hqsmem_ros.ros import dds_transport
    dds_transport.apply()  # large frames between processes (config/fastdds.xml), before rclpy.init
    init_without_ros_signal_handlers(sys.argv if argv is None else argv)
    node = Recorder()

    def close():  # once no callback can write any more
        node.close()
        node.get_logger().info(f"recorded {node.counts}")

    with tool_spinning(node, MultiThreadedExecutor(num_threads=2), on_stopped=close):
        while not node.done.wait(0.2):
            if (node.idle_timeout and node.last_message is not None
                    and time.monotonic() - node.last_message > node.idle_timeout):
                break
        if node.done.is_set():
            time.sleep(0.5)  # the last frame's objects/overlay may come just after its masks
    return 0


if __name__ == "__main__":
    sys.exit(main())
