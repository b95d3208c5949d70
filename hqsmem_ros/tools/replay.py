"""Play a rosbag2 bag's images over ROS 2 with a /clock, like `ros2 bag play BAG --clock`.

  python -m hqsmem_ros.tools.replay BAG --image-topic /camera/image_raw [--rate 2] [--lockstep]

For machines without `ros2 bag` (the PyPI ROS wheels have no rosbag2_py/ros2cli) and for tests:
the bag is read with `rosbags`, each recorded message is published as the recorded CDR bytes
(exactly what rosbag2 does), at the recorded pace (`rate` times faster), and /clock
(rosgraph_msgs/Clock) carries the bag time: before every message and, while waiting for the next
one, `clock_hz` times per second. A node started with use_sim_time then runs on the bag's time.

With `lockstep`, after each image the player waits for the tracker's result with that image's
header stamp on `results_topic` (or `lockstep_timeout`), the way a paused `ros2 bag play` would:
the node then sees every frame whatever the machine's speed, so its output can be compared frame
by frame with `hqsmem bag` on the same bag. Images are published reliable (depth `qos_depth`).
"""
from __future__ import annotations

import argparse
import importlib
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock

from hqsmem_ros.io.bagfiles import BagError, IMAGE_TYPE, COMPRESSED_TYPE, make_typestore, open_bag
from hqsmem_ros.ros.spinning import init_without_ros_signal_handlers, tool_spinning

DEFAULT_RESULTS_TOPIC = "/hqsmem_node/objects"


@dataclass
class ReplaySummary:
    published: Dict[str, int] = field(default_factory=dict)  # topic -> messages
    image_stamps_ns: List[int] = field(default_factory=list)  # header stamps of the images, in order
    clock_messages: int = 0
    last_clock_ns: Optional[int] = None
    without_result: List[int] = field(default_factory=list)  # lockstep: image stamps that got none in time
    wall_s: float = 0.0


def header_stamp_ns(raw: bytes, topic: str) -> int:
    """Header stamp of a CDR message that starts with std_msgs/Header (Image, CompressedImage)."""
    if len(raw) < 12 or raw[0] != 0 or raw[1] not in (0, 1):
        raise BagError(f"topic {topic}: a message is not plain CDR (encapsulation {bytes(raw[:2]).hex()})")
    sec, nanosec = struct.unpack("<iI" if raw[1] == 1 else ">iI", bytes(raw[4:12]))
    return sec * 1_000_000_000 + nanosec


def _message_class(msgtype: str):
    """rclpy message class of 'pkg/msg/Name'."""
    pkg, kind, name = msgtype.split("/")
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ImportError, AttributeError) as exc:
        raise BagError(f"message type {msgtype} is not installed for rclpy ({exc})") from exc


class BagReplayer(Node):
    """A node that publishes a bag's image topic (and `extra_topics`) with /clock; call run()
    while an executor spins it in another thread."""

    def __init__(self, bag: Union[str, Path], image_topic: str, rate: float = 1.0,
                 extra_topics: Sequence[str] = (), clock: bool = True, clock_hz: float = 40.0,
                 lockstep: bool = False, results_topic: str = DEFAULT_RESULTS_TOPIC,
                 lockstep_timeout: float = 30.0, qos_depth: int = 100, wait_for_subscribers: int = 1,
                 discovery_timeout: float = 30.0, node_name: str = "bag_replayer", **node_kwargs):
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if clock and not clock_hz > 0:
            raise ValueError(f"clock_hz must be > 0, got {clock_hz}")
        self.bag = Path(bag)
        self.reader = open_bag(self.bag)  # BagError names the bag when it is missing or unreadable
        try:
            by_topic: Dict[str, list] = {}
            for c in self.reader.connections:
                by_topic.setdefault(c.topic, []).append(c)
            topics = [image_topic] + [t for t in extra_topics if t != image_topic]
            missing = [t for t in topics if t not in by_topic]
            if missing:
                raise BagError(f"{self.bag}: no topic {', '.join(missing)}; topics in the bag: "
                               f"{', '.join(sorted(by_topic))}")
            types = {c.msgtype for c in by_topic[image_topic]}
            if len(types) != 1 or not types <= {IMAGE_TYPE, COMPRESSED_TYPE}:
                raise BagError(f"{self.bag}: topic {image_topic} has type {', '.join(sorted(types))}; "
                               f"expected {IMAGE_TYPE} or {COMPRESSED_TYPE}")
            self.connections = [c for t in topics for c in by_topic[t]]
            self._check_definitions()
            self.classes = {t: _message_class(by_topic[t][0].msgtype) for t in topics}
        except Exception:
            self.reader.close()
            raise
        super().__init__(node_name, **node_kwargs)
        self.image_topic = image_topic
        self.rate = float(rate)
        self.clock_period = 1.0 / clock_hz if clock else None
        self.lockstep = lockstep
        self.lockstep_timeout = float(lockstep_timeout)
        self.wait_for_subscribers = int(wait_for_subscribers)
        self.discovery_timeout = float(discovery_timeout)
        qos = QoSProfile(depth=qos_depth, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
        self.pubs = {t: self.create_publisher(cls, t, qos) for t, cls in self.classes.items()}
        self.clock_pub = self.create_publisher(Clock, "/clock", 10) if clock else None
        self._seen: set = set()
        self._cv = threading.Condition()
        self.results_sub = None
        if lockstep:
            from hqsmem_ros.msg import TrackedObjectArray
            self.results_sub = self.create_subscription(
                TrackedObjectArray, results_topic, self._on_result,
                QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))

    def _check_definitions(self) -> None:
        """A topic recorded with another definition of its type cannot be published as is."""
        store = make_typestore()
        for c in self.connections:
            if c.digest and c.digest.startswith("RIHS01_") and c.msgtype in store.types:
                ours = store.hash_rihs01(c.msgtype)
                if c.digest != ours:
                    raise BagError(f"{self.bag}: {c.topic} was recorded with another definition of "
                                   f"{c.msgtype} (hash {c.digest}, installed: {ours})")

    def _on_result(self, msg) -> None:
        with self._cv:
            self._seen.add(msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec)
            self._cv.notify_all()

    def _wait_until(self, predicate, what: str) -> None:
        end = time.monotonic() + self.discovery_timeout
        while not predicate():
            if time.monotonic() > end:
                raise TimeoutError(f"bag replay: no {what} within {self.discovery_timeout:g} s")
            time.sleep(0.02)

    def _wait_for_peers(self) -> None:
        n = self.wait_for_subscribers
        if n > 0:
            self._wait_until(lambda: self.pubs[self.image_topic].get_subscription_count() >= n,
                             f"subscriber on {self.image_topic}")
            if self.clock_pub is not None:  # a use_sim_time node listens to /clock
                self._wait_until(lambda: self.clock_pub.get_subscription_count() >= n, "subscriber on /clock")
        if self.results_sub is not None:  # the first result must not go out before we listen
            self._wait_until(lambda: self.results_sub.get_publisher_count() > 0,
                             f"publisher on {self.results_sub.topic_name} (lockstep)")

    def _publish_clock(self, ns: int, summary: ReplaySummary) -> None:
        if self.clock_pub is None:
            return
        msg = Clock()
        msg.clock.sec, msg.clock.nanosec = divmod(int(ns), 1_000_000_000)
        self.clock_pub.publish(msg)
        summary.clock_messages += 1
        summary.last_clock_ns = int(ns)

    def _sleep_until(self, wall_target: float, bag_from: int, wall_from: float, bag_to: int,
                     summary: ReplaySummary) -> None:
        """Wait for the next message's time, with /clock ticking on at the replay rate."""
        while True:
            now = time.monotonic()
            if now >= wall_target:
                return
            step = wall_target - now if self.clock_period is None else min(self.clock_period, wall_target - now)
            time.sleep(step)
            if self.clock_period is not None and time.monotonic() < wall_target:
                bag_now = bag_from + int((time.monotonic() - wall_from) * self.rate * 1e9)
                self._publish_clock(min(bag_now, bag_to), summary)

    def run(self) -> ReplaySummary:
        summary = ReplaySummary(published={t: 0 for t in self.pubs})
        self._wait_for_peers()
        t_start = time.monotonic()
        prev_bag: Optional[int] = None
        prev_wall = 0.0
        try:
            for conn, bag_ns, raw in self.reader.messages(connections=self.connections):
                if prev_bag is not None and bag_ns > prev_bag:
                    self._sleep_until(prev_wall + (bag_ns - prev_bag) / self.rate * 1e-9,
                                      prev_bag, prev_wall, bag_ns, summary)
                self._publish_clock(bag_ns, summary)
                self.pubs[conn.topic].publish(bytes(raw))
                summary.published[conn.topic] += 1
                prev_bag, prev_wall = bag_ns, time.monotonic()
                if conn.topic != self.image_topic:
                    continue
                stamp = header_stamp_ns(raw, conn.topic)
                summary.image_stamps_ns.append(stamp)
                if self.lockstep:
                    with self._cv:
                        if not self._cv.wait_for(lambda: stamp in self._seen, self.lockstep_timeout):
                            summary.without_result.append(stamp)
                            self.get_logger().warning(
                                f"no result for the image stamped {stamp} within {self.lockstep_timeout:g} s")
        finally:
            summary.wall_s = time.monotonic() - t_start
        return summary

    def destroy_node(self) -> None:
        self.reader.close()
        super().destroy_node()


def main(argv: Optional[List[str]] = None) -> int:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    argv = sys.argv[1:] if argv is None else argv
    ros_args = argv[argv.index("--ros-args"):] if "--ros-args" in argv else []
    own = argv[:len(argv) - len(ros_args)]
    ap = argparse.ArgumentParser(prog="python -m hqsmem_ros.tools.replay", description=__doc__.split("\n")[0])
    ap.add_argument("bag")
    ap.add_argument("--image-topic", required=True)
    ap.add_argument("--rate", type=float, default=1.0, help="replay speed factor (2 = twice as fast)")
    ap.add_argument("--topic", action="append", default=[], help="another topic to play (repeatable)")
    ap.add_argument("--no-clock", action="store_true", help="do not publish /clock")
    ap.add_argument("--clock-hz", type=float, default=40.0)
    ap.add_argument("--lockstep", action="store_true",
                    help="after each image, wait for the tracker's result with its stamp")
    ap.add_argument("--results-topic", default=DEFAULT_RESULTS_TOPIC)
    ap.add_argument("--lockstep-timeout", type=float, default=30.0)
    ap.add_argument("--wait-for-subscribers", type=int, default=1, metavar="N",
                    help="start once the image topic and /clock each have N subscribers (e.g. the "
                         "tracker and a recorder): a node that joins later misses the first messages")
    ap.add_argument("--discovery-timeout", type=float, default=30.0,
                    help="seconds to wait for those subscribers before giving up")
    args = ap.parse_args(own)
    from hqsmem_ros.ros import dds_transport
    dds_transport.apply()  # large frames between processes (config/fastdds.xml), before rclpy.init
    init_without_ros_signal_handlers(["replay"] + ros_args)
    try:
        node = BagReplayer(args.bag, args.image_topic, rate=args.rate, extra_topics=args.topic,
                           clock=not args.no_clock, clock_hz=args.clock_hz, lockstep=args.lockstep,
                           results_topic=args.results_topic, lockstep_timeout=args.lockstep_timeout,
                           discovery_timeout=args.discovery_timeout,
                           wait_for_subscribers=args.wait_for_subscribers)
    except (BagError, ValueError) as exc:
        rclpy.shutdown()
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    code = 0
    with tool_spinning(node, SingleThreadedExecutor()):
        try:
            summary = node.run()
            time.sleep(0.5)  # let the last messages leave before the process ends
            counts = ", ".join(f"{n} on {t}" for t, n in summary.published.items())
            print(f"replayed {counts} in {summary.wall_s:.1f} s"
                  + (f"; {len(summary.without_result)} images got no result in time" if summary.without_result else ""))
            code = 1 if summary.without_result else 0
        except TimeoutError as exc:
            print(f"replay: {exc}", file=sys.stderr)
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
