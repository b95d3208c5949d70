"""Live = offline: the node under use_sim_time, fed a bag over real rclpy/Fast DDS with /clock
(hqsmem_ros.tools.replay, what `ros2 bag play --clock` does), publishes the same label images and
objects as `hqsmem bag` (hqsmem_ros.bag.process_bag) writes for the same bag, config and prompts.

Needs the ROS 2 wheels and the built interfaces (scripts/setup_ros.sh).
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import Collector

rclpy = pytest.importorskip("rclpy", reason="ROS 2 not installed: run scripts/setup_ros.sh")
from rclpy.context import Context  # noqa: E402
from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from hqsmem_ros.bag import BagError, process_bag, read_outputs, stamp_ns_of  # noqa: E402
from hqsmem_ros.core.config import load_config  # noqa: E402
from hqsmem_ros.tools.synth_bag import write_synthetic_bag  # noqa: E402
from hqsmem_ros.msg import TrackedObjectArray  # noqa: E402
from hqsmem_ros.io import image_codec as ic  # noqa: E402
from hqsmem_ros.ros.node import HQSMemNode  # noqa: E402
from hqsmem_ros.tools.replay import BagReplayer  # noqa: E402
from hqsmem_ros.ros.spinning import BackgroundSpinner  # noqa: E402

# A domain of its own (test_ros_node.py uses 1 + pid % 200), so parallel runs do not mix.
DOMAIN_ID = 1 + (os.getpid() + 101) % 200
FRAMES = 30
SIZE = (160, 120)
NS = "/hqsmem_node"


class LiveNode(Collector):
    """The tracking node (use_sim_time, reliable images, seeded by initial_mask) and a listener."""

    def __init__(self, image_topic, initial_mask, compressed, **extra):
        self.ctx = Context()
        rclpy.init(context=self.ctx, domain_id=DOMAIN_ID)
        sub_topic = "image/compressed" if compressed else "image"
        self.node = HQSMemNode(
            "hqsmem_node", context=self.ctx,
            cli_args=["--ros-args", "-r", f"{sub_topic}:={image_topic}"],
            parameter_overrides=[Parameter(k, value=v) for k, v in {
                "use_sim_time": True, "qos_reliability": "reliable", "qos_depth": 100,
                "input_type": "compressed" if compressed else "raw",
                "initial_mask": str(initial_mask), **extra}.items()])
        self.listener = rclpy.create_node("replay_listener", context=self.ctx)
        self.masks, self.objects, self.clock = [], [], []
        super().__init__()
        reliable = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE)
        self.masks_sub = self.listener.create_subscription(Image, f"{NS}/masks", self._on(self.masks), reliable)
        self.objects_sub = self.listener.create_subscription(
            TrackedObjectArray, f"{NS}/objects", self._on(self.objects), reliable)
        self.listener.create_subscription(Clock, "/clock", self._on(self.clock), reliable)
        # Also on the images, so that a replay waiting for 2 subscribers on the image topic and on
        # /clock (the node and this listener) starts only when the listener hears /clock too.
        self.listener.create_subscription(CompressedImage if compressed else Image, image_topic,
                                          lambda msg: None, reliable)
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.ctx)
        self.executor.add_node(self.node)
        self.executor.add_node(self.listener)
        self.spinner = BackgroundSpinner(self.executor).start()
        # masks are only published while someone listens: be matched before the first frame
        self.wait_for(lambda: self.node.masks_pub.get_subscription_count() > 0
                      and self.masks_sub.get_publisher_count() > 0
                      and self.objects_sub.get_publisher_count() > 0, "the listener to match the node")

    def wait_for(self, predicate, what, timeout=30.0):
        super().wait_for(predicate, what, timeout)

    def close(self):
        self.node.stop()
        self.spinner.stop()
        self.node.destroy_node()
        self.listener.destroy_node()
        rclpy.shutdown(context=self.ctx)


def _by_stamp(msgs):
    out = {}
    for m in msgs:
        out.setdefault(stamp_ns_of(m.header), []).append(m)
    return out


def _objects_tuple(arr):
    """Everything a TrackedObjectArray says about the tracking (labels aside: see below)."""
    return (int(arr.frame_index), int(arr.width), int(arr.height),
            [(int(o.id), float(o.x_min), float(o.y_min), float(o.x_max), float(o.y_max), float(o.score),
              bool(o.visible), bool(o.refined), int(o.area),
              np.float64(o.centroid_x).tobytes(), np.float64(o.centroid_y).tobytes())  # NaN == NaN
             for o in arr.objects])


@pytest.mark.parametrize("storage,image_format,player", [
    ("mcap", "rgb8", "in_process"),
    ("sqlite3", "jpeg", "command_line"),
    ("mcap", "rgb8", "full_speed_queue"),
])
def test_replay_under_sim_time_gives_the_masks_of_hqsmem_bag(tmp_path, storage, image_format, player):
    topic = "/camera/image_raw" + ("/compressed" if image_format == "jpeg" else "")
    info = write_synthetic_bag(tmp_path / "in_bag", frames=FRAMES, size=SIZE, storage=storage,
                               image_format=image_format, topic=topic, prompts="file")
    stamps = info["stamps_ns"]  # header stamp == bag time in synthetic bags
    # The same first-frame objects both ways: the prompts file (frame 0, every id of the label
    # PNG, mask = pixels of that id) and the node's initial_mask (the same PNG, the same rule).
    initial_mask = Path(str(info["bag"]) + ".prompt0.png")
    assert initial_mask.is_file()
    ids0 = sorted(int(v) for v in np.unique(info["labels0"]) if v)
    assert len(ids0) >= 2

    summary = process_bag(info["bag"], tmp_path / "out_bag", topic, prompts_file=info["prompts_file"],
                          progress=False, log=lambda text: None)
    assert summary.results == FRAMES and not summary.dropped
    offline = read_outputs(tmp_path / "out_bag")
    offline_masks, offline_objects = _by_stamp(m for _, m in offline[f"{NS}/masks"]), \
        _by_stamp(m for _, m in offline[f"{NS}/objects"])

    # Full speed (no lockstep, 50x the recorded pace, faster than the pipeline), as `ros2 bag
    # play --rate 50` would: frame_queue_size keeps every frame waiting instead of the newest.
    extra = {"frame_queue_size": 100} if player == "full_speed_queue" else {}
    live = LiveNode(topic, initial_mask, compressed=image_format == "jpeg", **extra)
    try:
        # the same pipeline configuration on both sides (both use the defaults)
        assert live.node.config.to_dict() == load_config(None).to_dict()
        assert live.node.get_parameter("use_sim_time").value is True
        if player in ("in_process", "full_speed_queue"):
            lockstep = player == "in_process"
            replayer = BagReplayer(info["bag"], topic, rate=2.0 if lockstep else 50.0, lockstep=lockstep,
                                   wait_for_subscribers=2,
                                   context=live.ctx)
            # Its own executor and thread, stopped before the replayer is destroyed (a node taken
            # out of a spinning executor can still be in the wait set that thread is building).
            spinner = BackgroundSpinner(SingleThreadedExecutor(context=live.ctx))
            spinner.executor.add_node(replayer)
            spinner.start()
            try:
                replay = replayer.run()
            finally:
                spinner.stop()
                replayer.destroy_node()
            assert replay.image_stamps_ns == stamps and replay.published == {topic: FRAMES}
            assert not replay.without_result
            assert replay.last_clock_ns == stamps[-1]
        else:  # `python -m hqsmem_ros.tools.replay` in its own process, over DDS
            env = dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN_ID))
            done = subprocess.run(
                [sys.executable, "-m", "hqsmem_ros.tools.replay", str(info["bag"]), "--image-topic", topic,
                 "--rate", "2", "--lockstep", "--lockstep-timeout", "60", "--wait-for-subscribers", "2"],
                env=env, capture_output=True, text=True, timeout=240)
            assert done.returncode == 0, done.stdout + done.stderr
            assert f"replayed {FRAMES} on {topic}" in done.stdout
        live.wait_for(lambda: len(live.masks) >= FRAMES and len(live.objects) >= FRAMES
                      and live.clock and stamp_ns_of_clock(live.clock[-1]) == stamps[-1],
                      "every frame's result and the last /clock")

        # /clock carried the bag's time, never back, and the node's clock follows it
        clock = [stamp_ns_of_clock(c) for c in live.clock]
        assert clock == sorted(clock) and clock[0] == stamps[0] and set(stamps) <= set(clock)
        # the node counts a frame just after publishing its results, and takes /clock on its own
        live.wait_for(lambda: live.node.get_clock().now().nanoseconds == stamps[-1]
                      and live.node.counters()["processed"] + sum(live.node.counters()["dropped"].values())
                      == FRAMES, "the node's clock and counters to settle")

        # every input stamp got exactly one label image and one objects message, nothing else
        masks, objects = _by_stamp(live.masks), _by_stamp(live.objects)
        assert sorted(masks) == sorted(objects) == stamps
        assert all(len(masks[s]) == 1 and len(objects[s]) == 1 for s in stamps)
        c = live.node.counters()
        assert c["received"] == c["processed"] == FRAMES and not c["dropped"] and c["resets"] == 0

        # ... and it is what `hqsmem bag` wrote for that stamp, pixel for pixel
        first = None
        for k, s in enumerate(stamps):
            live_label = ic.mask_from_msg(masks[s][0])
            (off_msg,) = offline_masks[s]
            off_label = ic.mask_from_msg(off_msg)
            assert live_label.dtype == off_label.dtype == np.uint16
            assert np.array_equal(live_label, off_label), f"frame {k}: {(live_label != off_label).sum()} pixels differ"
            (off_objs,) = offline_objects[s]
            assert _objects_tuple(objects[s][0]) == _objects_tuple(off_objs), f"frame {k}"
            # Labels: the prompts file names the objects ("object1"...), initial_mask cannot.
            assert [o.label for o in objects[s][0].objects] == [""] * len(off_objs.objects)
            if k == 0:
                assert sorted(int(v) for v in np.unique(live_label) if v) == ids0
            first = live_label if first is None else first
        assert not np.array_equal(first, live_label)  # the objects moved: a real sequence was compared
    finally:
        live.close()


def stamp_ns_of_clock(msg):
    return msg.clock.sec * 1_000_000_000 + msg.clock.nanosec


def test_replayer_refuses_a_missing_topic_and_a_wrong_type(tmp_path):
    info = write_synthetic_bag(tmp_path / "bag", frames=2, size=(64, 64), prompts="none")
    ctx = Context()
    rclpy.init(context=ctx, domain_id=DOMAIN_ID)
    try:
        with pytest.raises(BagError, match="no topic /nope.*/camera/image_raw"):
            BagReplayer(info["bag"], "/nope", context=ctx)
        with pytest.raises(BagError, match="camera_info has type sensor_msgs/msg/CameraInfo"):
            BagReplayer(info["bag"], "/camera/camera_info", context=ctx)
        with pytest.raises(BagError, match="not found"):
            BagReplayer(tmp_path / "missing", "/camera/image_raw", context=ctx)
        with pytest.raises(ValueError, match="rate"):
            BagReplayer(info["bag"], "/camera/image_raw", rate=0, context=ctx)
    finally:
        rclpy.shutdown(context=ctx)
