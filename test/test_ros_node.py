"""The tracking node over real rclpy and Fast DDS: frames in, label images and objects out.

Needs the ROS 2 wheels and the built interfaces (scripts/setup_ros.sh). Each test session uses
its own DDS domain (from the pid) so parallel runs on one machine do not hear each other.
"""
import os
from pathlib import Path
import threading
import time

import numpy as np
import pytest
from conftest import Collector

rclpy = pytest.importorskip("rclpy", reason="ROS 2 not installed: run scripts/setup_ros.sh")
from rclpy.context import Context  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from hqsmem_ros.msg import ObjectPrompt, ObjectPromptArray, TrackedObjectArray  # noqa: E402
from hqsmem_ros.io import image_codec as ic  # noqa: E402
from hqsmem_ros.core.config import ConfigError  # noqa: E402
from hqsmem_ros.ros.node import HQSMemNode  # noqa: E402
from hqsmem_ros.ros.spinning import BackgroundSpinner  # noqa: E402
from hqsmem_ros.srv import AddObjects, RemoveObjects, Reset  # noqa: E402

DOMAIN_ID = 1 + os.getpid() % 200  # 1..200, away from the default domain 0
W, H = 160, 120


def _scene(k):
    """Frame k: textured background, a red square moving right and a blue disc moving down."""
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([(xx * 7 + yy * 3) % 64 + 60, (xx * 3 + yy * 5) % 64 + 60,
                    (xx * 5 + yy * 7) % 64 + 60], -1).astype(np.uint8)
    labels = np.zeros((H, W), np.uint16)
    x0 = 20 + 2 * k
    labels[40:80, x0:x0 + 40] = 1
    disc = (xx - 110) ** 2 + (yy - (30 + k)) ** 2 < 18 ** 2
    labels[disc] = 2
    rgb[labels == 1] = (220, 40, 40)
    rgb[labels == 2] = (40, 60, 230)
    return rgb, labels


class Harness(Collector):
    """One rclpy context on a private domain: the node under test plus a client node."""

    def __init__(self, overrides=(), name="hqsmem_node"):
        self.ctx = Context()
        rclpy.init(context=self.ctx, domain_id=DOMAIN_ID)
        self.node = HQSMemNode(name, context=self.ctx, parameter_overrides=[
            Parameter(k, value=v) for k, v in dict(overrides).items()])
        self.client = rclpy.create_node("test_client", context=self.ctx)
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.ctx)
        self.executor.add_node(self.node)
        self.executor.add_node(self.client)
        self.spinner = BackgroundSpinner(self.executor).start()
        self.results, self.masks, self.diags = [], [], []
        super().__init__()
        ns = f"/{name}"
        self.client.create_subscription(TrackedObjectArray, f"{ns}/objects", self._on(self.results), 50)
        self.client.create_subscription(Image, f"{ns}/masks", self._on(self.masks), 50)
        self.client.create_subscription(DiagnosticArray, "/diagnostics", self._on(self.diags), 50)
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.image_pub = self.client.create_publisher(Image, "image", qos)
        self.compressed_pub = self.client.create_publisher(CompressedImage, "image/compressed", qos)
        self.prompt_pub = self.client.create_publisher(ObjectPromptArray, f"{ns}/prompts", 10)
        self.add = self.client.create_client(AddObjects, f"{ns}/add_objects")
        self.remove = self.client.create_client(RemoveObjects, f"{ns}/remove_objects")
        self.reset = self.client.create_client(Reset, f"{ns}/reset")
        self.param_client = self.client.create_client(
            __import__("rcl_interfaces.srv", fromlist=["SetParameters"]).SetParameters,
            f"{ns}/set_parameters")
        for c in (self.add, self.remove, self.reset, self.param_client):
            assert c.wait_for_service(timeout_sec=10), c.srv_name
        self.wait_for(lambda: self.image_pub.get_subscription_count() > 0
                      or self.compressed_pub.get_subscription_count() > 0, "discovery")
        self.wait_for(lambda: self.node.count_publishers(f"{ns}/objects") and
                      self.objects_matched(), "objects subscription match")

    def objects_matched(self):
        return self.node.objects_pub.get_subscription_count() > 0 and self.node.masks_pub.get_subscription_count() > 0


    def image_msg(self, rgb, stamp, encoding="rgb8"):
        if encoding == "rgb8":
            fields = ic.rgb_to_fields(rgb)
        else:
            fields = ic.encode_image(rgb[..., ::-1].copy(), "bgr8")
        msg = ic.fill_image_msg(Image(), fields)
        msg.header.stamp.sec, msg.header.stamp.nanosec = int(stamp), int(round((stamp % 1) * 1e9))
        msg.header.frame_id = "camera"
        return msg

    def send(self, msg, wait=True):
        """Publish one frame; with wait, until the node has accounted for it."""
        before = self.node.counters()
        done_before = before["processed"] + sum(before["dropped"].values())
        (self.compressed_pub if isinstance(msg, CompressedImage) else self.image_pub).publish(msg)
        if wait:
            self.wait_for(lambda: self._accounted() > done_before, "the frame to be processed or dropped")
            if self.node.counters()["processed"] > before["processed"]:
                stamp = (msg.header.stamp.sec, msg.header.stamp.nanosec)
                self.wait_for(lambda: any((r.header.stamp.sec, r.header.stamp.nanosec) == stamp
                                          for r in self.results), "the result to arrive")

    def _accounted(self):
        c = self.node.counters()
        return c["processed"] + sum(c["dropped"].values())

    def ask_then_send(self, client, request, frame_msg):
        """Call a service that applies on the next frame: wait until the node holds the request
        (or has already refused it), then send the frame; returns the answer's future."""
        future = client.call_async(request)
        self.wait_for(lambda: future.done() or self.node.counters()["requests_waiting"] > 0,
                      "the request to be queued")
        self.send(frame_msg, wait=False)
        self.wait_for(future.done, f"{client.srv_name} answer")
        return future

    def call(self, client, request, timeout=20.0):
        future = client.call_async(request)
        end = time.monotonic() + timeout
        while not future.done():
            assert time.monotonic() < end, f"no answer from {client.srv_name}"
            time.sleep(0.01)
        return future.result()

    def set_params(self, **values):
        from rcl_interfaces.srv import SetParameters
        req = SetParameters.Request()
        req.parameters = [Parameter(k, value=v).to_parameter_msg() for k, v in values.items()]
        return self.call(self.param_client, req).results

    def close(self):
        self.node.stop()
        self.spinner.stop()
        self.node.destroy_node()
        self.client.destroy_node()
        rclpy.shutdown(context=self.ctx)


def _prompt(oid=0, labels=None, label_value=None, box=None, text=""):
    p = ObjectPrompt()
    p.id = oid
    p.label = text
    if labels is not None:
        m = (labels == label_value).astype(np.uint8) * 255
        ic.fill_image_msg(p.mask, ic.encode_image(m, "mono8"))
    if box is not None:
        p.has_box = True
        p.x_min, p.y_min, p.x_max, p.y_max = (float(v) for v in box)
    return p


@pytest.fixture
def harness():
    made = []

    def make(**overrides):
        h = Harness(overrides)
        made.append(h)
        return h
    yield make
    for h in made:
        h.close()


def _by_stamp(results, stamp):
    sec, nsec = int(stamp), int(round((stamp % 1) * 1e9))
    return [r for r in results if (r.header.stamp.sec, r.header.stamp.nanosec) == (sec, nsec)]


def test_frames_in_label_images_and_objects_out(harness):
    h = harness()
    rgb0, labels0 = _scene(0)
    h.prompt_pub.publish(ObjectPromptArray(prompts=[
        _prompt(0, labels0, 1, text="red box"), _prompt(0, labels0, 2)]))
    h.wait_for(lambda: h.node.counters()["requests_waiting"] == 1, "the topic prompt to be queued")
    stamps = [100.0 + k / 30 for k in range(6)]
    for k, stamp in enumerate(stamps):
        h.send(h.image_msg(_scene(k)[0], stamp, "bgr8" if k % 2 else "rgb8"))
    h.wait_for(lambda: len(h.masks) >= len(stamps), "all label images")
    ids = None
    for k, stamp in enumerate(stamps):
        (objs,) = _by_stamp(h.results, stamp)
        (mask,) = _by_stamp(h.masks, stamp)
        assert mask.header.frame_id == objs.header.frame_id == "camera"
        assert (mask.encoding, mask.width, mask.height) == ("mono16", W, H)
        assert (objs.width, objs.height) == (W, H)
        label = ic.mask_from_msg(mask)
        got_ids = [o.id for o in objs.objects]
        ids = ids or got_ids
        assert got_ids == ids and len(ids) == 2, got_ids  # the same two ids on every frame
        assert set(np.unique(label)) <= {0, *ids}
        truth = _scene(k)[1]
        for o, true_value in zip(objs.objects, (1, 2)):
            pred = label == o.id
            iou = (pred & (truth == true_value)).sum() / max(1, (pred | (truth == true_value)).sum())
            assert iou > 0.7, (k, o.id, iou)
            assert o.visible and o.area == int(pred.sum())
            ys, xs = np.nonzero(pred)
            assert (o.x_min, o.y_min, o.x_max, o.y_max) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert abs(o.centroid_x - xs.mean()) < 0.01 and abs(o.centroid_y - ys.mean()) < 0.01
    assert ids == [1, 2]  # fresh ids start at 1
    assert [o.label for o in h.results[-1].objects] == ["red box", ""]
    frame_indices = [r.frame_index for r in h.results]
    assert frame_indices == sorted(frame_indices)
    c = h.node.counters()
    assert c["received"] == len(stamps) == c["processed"] and not c["dropped"]


def test_services_add_remove_reset_and_ids_are_never_reused(harness):
    h = harness()
    rgb0, labels0 = _scene(0)
    h.send(h.image_msg(rgb0, 1.0))  # a frame with no objects yet
    assert h.results[-1].objects == []

    # add by box with a requested id; the service answers once a frame applied it
    rgb1, _ = _scene(1)
    future = h.ask_then_send(h.add, AddObjects.Request(prompts=[_prompt(5, box=(20, 40, 60, 80))]),
                             h.image_msg(rgb1, 2.0))
    res = future.result()
    assert res.success and list(res.ids) == [5], res.message
    assert "frame" in res.message

    # id 0 -> a fresh id (the lowest never used); a mask prompt
    future = h.ask_then_send(h.add, AddObjects.Request(prompts=[_prompt(0, _scene(2)[1], 2)]), h.image_msg(_scene(2)[0], 3.0))
    assert future.result().success and list(future.result().ids) == [1]
    h.wait_for(lambda: _by_stamp(h.results, 3.0), "result of frame 3")
    assert [o.id for o in _by_stamp(h.results, 3.0)[0].objects] == [1, 5]

    # remove 5: the other object keeps its id and track
    future = h.ask_then_send(h.remove, RemoveObjects.Request(ids=[5]), h.image_msg(_scene(3)[0], 4.0))
    assert future.result().success and list(future.result().removed_ids) == [5]
    h.wait_for(lambda: _by_stamp(h.results, 4.0), "result of frame 4")
    (after,) = _by_stamp(h.results, 4.0)
    assert [o.id for o in after.objects] == [1] and after.objects[0].visible

    # a removed id is refused with a reason; unknown ids cannot be removed
    res = h.call(h.add, AddObjects.Request(prompts=[_prompt(5, box=(20, 40, 60, 80))]))
    assert not res.success and "never reused" in res.message
    res = h.call(h.remove, RemoveObjects.Request(ids=[42]))
    assert not res.success and "42" in res.message and list(res.removed_ids) == []
    res = h.call(h.add, AddObjects.Request(prompts=[_prompt(9, box=(1, 1, 20, 20)), _prompt(9, box=(30, 30, 50, 50))]))
    assert not res.success and "twice" in res.message

    # reset retires the tracked ids; the next fresh id is new
    res = h.call(h.reset, Reset.Request())
    assert res.success and list(res.cleared_ids) == [1]
    h.send(h.image_msg(_scene(4)[0], 5.0))
    assert _by_stamp(h.results, 5.0)[0].objects == []
    future = h.ask_then_send(h.add, AddObjects.Request(prompts=[_prompt(0, box=(28, 40, 68, 80))]), h.image_msg(_scene(4)[0], 6.0))
    assert list(future.result().ids) == [2]  # 1 and 5 are retired
    assert h.node.counters()["bad_requests"] == {"~/add_objects": 2, "~/remove_objects": 1}


def test_click_prompts_by_service_start_objects(harness):
    from geometry_msgs.msg import Point32
    h = harness()
    h.send(h.image_msg(_scene(0)[0], 1.0))
    rgb1, labels1 = _scene(1)
    p = _prompt(0, text="clicked")
    p.positive_points = [Point32(x=42.0, y=60.0)]  # inside the red square of frame 1
    p.negative_points = [Point32(x=110.0, y=31.0)]  # on the blue disc
    future = h.ask_then_send(h.add, AddObjects.Request(prompts=[p]), h.image_msg(rgb1, 2.0))
    res = future.result()
    assert res.success and len(res.ids) == 1, res.message
    oid = res.ids[0]
    h.wait_for(lambda: _by_stamp(h.masks, 2.0), "the label image of frame 2")
    label = ic.mask_from_msg(_by_stamp(h.masks, 2.0)[0])
    gt = labels1 == 1
    m = label == oid
    assert (m & gt).sum() / (m | gt).sum() > 0.8
    (objs,) = _by_stamp(h.results, 2.0)
    assert [(o.id, o.label) for o in objs.objects] == [(oid, "clicked")]
    # a click outside the image is refused with the reason, nothing changes
    bad = _prompt(0)
    bad.positive_points = [Point32(x=500.0, y=10.0)]
    future = h.ask_then_send(h.add, AddObjects.Request(prompts=[bad]), h.image_msg(_scene(2)[0], 3.0))
    assert not future.result().success and "outside" in future.result().message


def test_add_objects_without_frames_times_out_cleanly(harness):
    h = harness(service_timeout=0.3)
    res = h.call(h.add, AddObjects.Request(prompts=[_prompt(0, box=(1, 1, 30, 30))]))
    assert not res.success and "no camera frame" in res.message
    assert not h.node.counters()["requests_waiting"]  # withdrawn: a later frame does not apply it
    h.send(h.image_msg(_scene(0)[0], 1.0))
    assert h.results[-1].objects == []


@pytest.mark.parametrize("make_bad,reason", [
    (lambda m: setattr(m, "encoding", "rgb16"), "unsupported image encoding 'rgb16'"),
    (lambda m: setattr(m, "step", m.step - 1), "step"),
    (lambda m: setattr(m, "data", m.data[:-100]), "truncated"),
])
def test_bad_images_are_dropped_with_a_reason_and_the_node_goes_on(harness, make_bad, reason):
    h = harness()
    bad = h.image_msg(_scene(0)[0], 1.0)
    make_bad(bad)
    h.send(bad)
    c = h.node.counters()
    assert c["dropped"] == {"bad_image": 1} and c["processed"] == 0
    assert reason in h.node.last_error
    h.send(h.image_msg(_scene(1)[0], 2.0))  # the next good frame is processed
    assert h.node.counters()["processed"] == 1
    # diagnostics report the drop with its reason
    h.wait_for(lambda: any(any(kv.key == "dropped.bad_image" for kv in d.status[0].values) for d in h.diags),
               "diagnostics with the drop")
    d = next(d for d in h.diags if any(kv.key == "dropped.bad_image" for kv in d.status[0].values))
    values = {kv.key: kv.value for kv in d.status[0].values}
    assert values["dropped.bad_image"] == "1" and values["frames_received"] in ("1", "2")
    assert "latency_ms.track" in values or values["frames_processed"] == "0"
    assert {"memory_size", "memory_capacity", "device", "tracker", "refiner", "features"} <= set(values)


def test_compressed_input_and_corrupt_data(harness):
    h = harness(input_type="compressed")
    rgb, _ = _scene(0)
    good = CompressedImage(format="png", data=ic.encode_compressed(rgb, "png"))
    good.header.stamp.sec = 1
    bad = CompressedImage(format="jpeg", data=b"\xff\xd8\xff\xe0garbage" * 10)
    bad.header.stamp.sec = 2
    h.send(bad)
    assert "corrupt" in h.node.last_error
    good2 = CompressedImage(format="png", data=good.data)
    good2.header.stamp.sec = 3
    h.send(good)
    h.send(good2)
    c = h.node.counters()
    assert c["processed"] == 2 and c["dropped"] == {"bad_image": 1}


def test_decompression_bomb_and_oversized_raw_frames_are_dropped_and_the_node_goes_on(harness):
    from hqsmem_ros.tools.bench_bomb import jpeg_claiming
    h = harness(input_type="compressed")
    bomb = CompressedImage(format="jpeg", data=jpeg_claiming(60000, 60000, pad_to=12_000))
    bomb.header.stamp.sec = 1
    h.send(bomb)
    assert "60000x60000" in h.node._last_error and "max_image_pixels" in h.node._last_error
    rgb, _ = _scene(0)
    good = CompressedImage(format="jpeg", data=ic.encode_compressed(rgb, "jpeg"))
    good.header.stamp.sec = 2
    h.send(good)
    c = h.node.counters()
    assert c["processed"] == 1 and c["dropped"] == {"bad_image": 1}
    # a limit of its own, for raw frames: 160x120 = 19200 pixels is over 19199
    h2 = Harness({"max_image_pixels": 19199}, name="small_limit")
    try:
        h2.send(h2.image_msg(rgb, 3.0))
        assert h2.node.counters()["dropped"] == {"bad_image": 1}
        assert "exceeds the limit of 19199" in h2.node._last_error
    finally:
        h2.close()


def test_transport_losses_over_a_few_percent_warn_with_the_hint(harness):
    h = harness()
    a = b"A" * 16  # a publisher's gid
    h.node.sequence.see(a, 1)
    for k in range(40):  # 40 frames arrive, 1 of 41 lost (2.4 %): under the warning's 3 %
        h.send(h.image_msg(_scene(k)[0], 10.0 + k))
    h.node.sequence.see(a, 3)
    h.node._last_error = None
    n = len(h.diags)
    h.wait_for(lambda: len(h.diags) > n + 1, "diagnostics")
    assert h.diags[-1].status[0].level == DiagnosticStatus.OK
    h.node.sequence.see(a, 10)  # 7 of 47 lost
    n = len(h.diags)
    h.wait_for(lambda: len(h.diags) > n + 1, "diagnostics")
    status = h.diags[-1].status[0]
    assert status.level == DiagnosticStatus.WARN and "lost in transport" in status.message
    assert "fastdds.xml" in status.message


def test_bad_prompts_are_refused_and_tracking_continues(harness):
    h = harness()
    h.send(h.image_msg(_scene(0)[0], 1.0))
    # out-of-image box (the frame size is known only when applying): refused, frame processed
    future = h.ask_then_send(h.add, AddObjects.Request(prompts=[_prompt(0, box=(500, 500, 600, 600))]), h.image_msg(_scene(1)[0], 2.0))
    assert not future.result().success and "outside" in future.result().message
    h.wait_for(lambda: _by_stamp(h.results, 2.0), "frame 2 result despite the bad prompt")
    # empty box, mask of the wrong size and wrong encoding: refused before any frame
    for prompt, words in [
        (_prompt(0, box=(10, 10, 10, 30)), "empty"),
        (_prompt(3, np.zeros((10, 10), np.uint16) + 3, 3), "10x10"),
    ]:
        future = h.ask_then_send(h.add, AddObjects.Request(prompts=[prompt]), h.image_msg(_scene(2)[0], 3.0 + len(h.results)))
        assert not future.result().success and words in future.result().message, future.result().message
    p = _prompt(0, box=(10, 10, 30, 30))
    ic.fill_image_msg(p.mask, ic.encode_image(np.zeros((H, W, 3), np.uint8), "rgb8"))
    res = h.call(h.add, AddObjects.Request(prompts=[p]))
    assert not res.success and "mask encoding 'rgb8'" in res.message


def test_parameters_validated_and_unsafe_changes_refused(harness):
    h = harness()
    ok, = h.set_params(**{"pipeline.tau_verify": 0.5})
    assert ok.successful
    h.send(h.image_msg(_scene(0)[0], 1.0))  # applied between frames
    assert h.node.pipeline.config.tau_verify == 0.5
    bad, = h.set_params(**{"pipeline.tau_verify": 2.0})
    assert not bad.successful and "tau_verify" in bad.reason
    fixed, = h.set_params(**{"pipeline.tracker.type": "other"})
    assert not fixed.successful and ("read-only" in fixed.reason.lower() or "restart" in fixed.reason)
    fixed, = h.set_params(**{"pipeline.memory_capacity": 3})
    assert not fixed.successful
    wrong, = h.set_params(overlay_alpha=3.0)
    assert not wrong.successful
    assert h.node.get_parameter("overlay_alpha").value == 0.5
    assert h.node.pipeline.config.memory_capacity == 8


def test_invalid_startup_parameters_name_the_parameter():
    ctx = Context()
    rclpy.init(context=ctx, domain_id=DOMAIN_ID)
    try:
        for overrides, words in [({"pipeline.tau_verify": 7.0}, "tau_verify"),
                                 ({"input_type": "mjpeg"}, "input_type"),
                                 ({"frame_queue_size": 0}, "frame_queue_size"),
                                 ({"initial_mask": "/nonexistent/m.png"}, "/nonexistent/m.png"),
                                 # typos: every parameter the node does not declare, with a hint
                                 ({"qos_dpeth": 3}, "unknown key 'qos_dpeth'; did you mean 'qos_depth'?"),
                                 ({"pipeline.tau_verfy": 0.5}, "did you mean 'pipeline.tau_verify'?"),
                                 # a GPU this machine does not have: refused, never the CPU instead
                                 ({"pipeline.device": "cuda:999"}, "cuda:999")]:
            with pytest.raises(ValueError) as e:
                HQSMemNode(context=ctx, parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
            assert words in str(e.value)
    finally:
        rclpy.shutdown(context=ctx)


def test_drop_accounting_under_a_burst(harness):
    h = harness(qos_reliability="reliable", qos_depth=100)
    _, labels0 = _scene(0)
    h.prompt_pub.publish(ObjectPromptArray(prompts=[_prompt(0, labels0, 1), _prompt(0, labels0, 2)]))
    h.wait_for(lambda: h.node.counters()["requests_waiting"] == 1, "the prompt to be queued")
    n = 40
    for k in range(n):  # as fast as possible: the node must keep only the newest frame
        h.send(h.image_msg(_scene(k % 20)[0], 10.0 + k / 30), wait=False)
    h.wait_for(lambda: h.node.counters()["received"] == n, "all frames to arrive")
    h.wait_for(lambda: h._accounted() == n, "every frame to be accounted for")
    c = h.node.counters()
    h.wait_for(lambda: len(h.results) == c["processed"], "all results")
    assert c["processed"] + c["dropped"].get("replaced", 0) == n
    assert set(c["dropped"]) <= {"replaced"}
    stamps = [r.header.stamp.sec + r.header.stamp.nanosec * 1e-9 for r in h.results]
    assert stamps == sorted(stamps)  # newest-first never reorders frames
    assert abs(stamps[-1] - (10.0 + (n - 1) / 30)) < 1e-6  # the last frame always gets a result


def test_frame_queue_processes_every_frame_of_a_burst_in_order(harness):
    h = harness(qos_reliability="reliable", qos_depth=100, frame_queue_size=100)
    _, labels0 = _scene(0)
    h.prompt_pub.publish(ObjectPromptArray(prompts=[_prompt(0, labels0, 1), _prompt(0, labels0, 2)]))
    h.wait_for(lambda: h.node.counters()["requests_waiting"] == 1, "the prompt to be queued")
    n = 40
    for k in range(n):  # as fast as possible, faster than the pipeline
        h.send(h.image_msg(_scene(k % 20)[0], 10.0 + k / 30), wait=False)
    h.wait_for(lambda: h.node.counters()["processed"] == n, "every frame to be processed")
    h.wait_for(lambda: len(h.results) == n, "all results")
    c = h.node.counters()
    assert c["received"] == n and not c["dropped"] and c["pending"] == 0
    stamps = [r.header.stamp.sec + r.header.stamp.nanosec * 1e-9 for r in h.results]
    np.testing.assert_allclose(stamps, [10.0 + k / 30 for k in range(n)], atol=1e-6)


def test_frames_overwritten_in_the_dds_history_are_counted_as_lost_in_transport(harness):
    # Depth 1, and a node that takes no message for a while (off the executor): the frames
    # published meanwhile overwrite each other in its subscription's history, and the
    # publisher's sequence numbers show the gaps, so nothing is lost silently. Nothing here
    # depends on timing: the publisher waits until the subscription has acknowledged every frame
    # (it holds the last one) before the node spins again.
    from rclpy.duration import Duration
    h = harness(qos_reliability="reliable", qos_depth=1)
    n = 30
    # The first frame, received alone, gives the node the publisher's reference number (frames
    # lost before a publisher's first received frame cannot be told from frames sent before
    # the subscription matched).
    h.send(h.image_msg(_scene(0)[0], 19.0))
    h.executor.remove_node(h.node)
    # Two full executor cycles (a guard condition of the client node, triggered twice): the
    # second wait is built after the removal, so no wait in progress still holds the node.
    cycled = threading.Event()
    guard = h.client.create_guard_condition(cycled.set)
    for _ in range(2):
        cycled.clear()
        guard.trigger()
        assert cycled.wait(20), "the executor did not cycle"
    for k in range(1, n):
        h.image_pub.publish(h.image_msg(_scene(k % 20)[0], 20.0 + k / 30))
    assert h.image_pub.wait_for_all_acked(Duration(seconds=30))
    h.executor.add_node(h.node)
    h.wait_for(lambda: (lambda c: c["received"] + c["lost_in_transport"] == n
                        and h._accounted() == c["received"])(h.node.counters()),
               "every published frame to be received or counted lost")
    c = h.node.counters()
    assert c["received"] == 2 and c["lost_in_transport"] == c["sequence_gaps"] == n - 2, c
    assert c["processed"] + sum(c["dropped"].values()) == c["received"]
    assert c["unknown_before_first"] == 0  # the publisher's first frame was received


def test_sequence_numbers_of_message_info_are_read_per_publisher():
    from hqsmem_ros.ros.node import publisher_key
    assert publisher_key({"publisher_gid": {"data": b"A" * 16}, "publication_sequence_number": 7}) == (b"A" * 16, 7)
    assert publisher_key({"publication_sequence_number": None, "publisher_gid": None}) == (None, None)


def test_stamps_going_back_reset_and_reseed_from_initial_mask(harness, tmp_path):
    from PIL import Image as PILImage
    rgb0, labels0 = _scene(0)
    png = tmp_path / "00000.png"
    PILImage.fromarray((labels0 * 3).astype(np.uint8)).save(png)  # ids 3 and 6
    h = harness(initial_mask=str(png))
    for k, stamp in enumerate([50.0, 50.1, 50.2]):
        h.send(h.image_msg(_scene(k)[0], stamp))
    assert [o.id for o in h.results[0].objects] == [3, 6]
    h.send(h.image_msg(rgb0, 10.0))  # the bag looped
    c = h.node.counters()
    assert c["resets"] == 1 and c["processed"] == 4 and not c["dropped"]
    new_ids = [o.id for o in _by_stamp(h.results, 10.0)[0].objects]
    assert len(new_ids) == 2 and not set(new_ids) & {3, 6}  # seeded again, with fresh ids


def test_hqsmem_node_process_with_config_file_and_ros_args(tmp_path):
    """The node as its own process (`hqsmem node` / the demo): --config plus -p overrides."""
    import signal
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN_ID))
    proc = subprocess.Popen(
        [sys.executable, "-m", "hqsmem_ros.ros.main", "--config", os.path.join(root, "config", "track.yaml"),
         "--ros-args", "-r", "__node:=proc_node", "-p", "qos_reliability:=reliable",
         "-p", "pipeline.tau_verify:=0.8"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ctx = Context()
    rclpy.init(context=ctx, domain_id=DOMAIN_ID)
    node = rclpy.create_node("proc_client", context=ctx)
    got = []
    node.create_subscription(TrackedObjectArray, "/proc_node/objects", got.append, 10)
    pub = node.create_publisher(Image, "image", 10)
    prompts = node.create_publisher(ObjectPromptArray, "/proc_node/prompts", 10)
    try:
        end = time.monotonic() + 60
        while (pub.get_subscription_count() == 0 or node.count_publishers("/proc_node/objects") == 0
               or prompts.get_subscription_count() == 0):
            assert time.monotonic() < end and proc.poll() is None, "node process did not come up"
            time.sleep(0.05)
        _spin_some(node, ctx, 0.5)  # let the matches settle both ways
        _, labels0 = _scene(0)
        prompts.publish(ObjectPromptArray(prompts=[_prompt(0, labels0, 1)]))
        _spin_some(node, ctx, 0.3)
        h = Harness.__new__(Harness)  # only for image_msg()
        sent = 0
        # Until the prompt shows: it applies to the first frame after it reached the node, which
        # under load may be a later one than the third (the test does not depend on when).
        while len(got) < 3 or not any(o.id == 1 for r in got for o in r.objects):
            assert time.monotonic() < end, f"{len(got)} results from the node process, none with the prompt"
            pub.publish(h.image_msg(_scene(sent % 20)[0], 5.0 + sent))
            sent += 1
            _spin_some(node, ctx, 0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    assert proc.returncode == 0, out
    assert "reliable" in out and "stopped:" in out, out
    assert "Failed to publish log message" not in out, out


def test_hqsmem_node_refuses_unknown_keys_and_wrong_types_before_starting(tmp_path):
    """One rule, whatever the source: parameter file, plain pipeline YAML, -p (with or without
    --config). Exit 2 and one line naming the key and where it came from."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    track = os.path.join(root, "config", "track.yaml")
    (tmp_path / "ros.yaml").write_text("/**:\n  ros__parameters:\n    qos_dpeth: 3\n"
                                       "    pipeline:\n      tau_verify: 0.5\n")
    (tmp_path / "ros_pipe.yaml").write_text("/**:\n  ros__parameters:\n    pipeline:\n      tau_verfy: 0.5\n")
    (tmp_path / "plain.yaml").write_text("tau_verify: 0.5\nmemory_capacty: 4\n")
    (tmp_path / "latin1.yaml").write_bytes("tau_verify: 0.5 # caf\xe9\n".encode("latin-1"))
    cases = [
        (["--config", tmp_path / "ros.yaml"], ["ros.yaml", "'qos_dpeth'", "did you mean 'qos_depth'"]),
        (["--config", tmp_path / "ros_pipe.yaml"], ["ros_pipe.yaml", "did you mean 'pipeline.tau_verify'"]),
        (["--config", tmp_path / "plain.yaml"], ["plain.yaml", "memory_capacty", "memory_capacity"]),
        (["--config", track, "--ros-args", "-p", "qos_depth:=abc"], ["qos_depth", "integer", "'abc'"]),
        (["--ros-args", "-p", "qos_depth:=abc"], ["qos_depth", "integer", "'abc'"]),
        (["--config", track, "--ros-args", "-p", "pipeline.tau_verify:=abc"], ["tau_verify", "'abc'"]),
        (["--ros-args", "-p", "pipeline.tau_verify:=abc"], ["tau_verify", "'abc'"]),
        (["--ros-args", "--params-file", tmp_path / "ros.yaml"], ["ros.yaml", "'qos_dpeth'"]),
        (["--config", tmp_path / "latin1.yaml"], ["latin1.yaml", "UTF-8"]),
        (["--config", tmp_path / "missing.yaml"], ["missing.yaml", "not found"]),
    ]
    for args, words in cases:
        r = subprocess.run([sys.executable, "-m", "hqsmem_ros.ros.main", *map(str, args)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        assert all(w in r.stderr for w in words), (args, r.stderr)


def _spin_some(node, ctx, seconds):
    from rclpy.executors import SingleThreadedExecutor
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ex.spin_once(timeout_sec=0.05)
    ex.remove_node(node)


def _publish_clock(h, pub, seconds):
    """Publish /clock and wait until the node's ROS time shows it."""
    from rosgraph_msgs.msg import Clock
    msg = Clock()
    msg.clock.sec, msg.clock.nanosec = int(seconds), int(round((seconds % 1) * 1e9))
    target = msg.clock.sec * 1_000_000_000 + msg.clock.nanosec
    end = time.monotonic() + 20
    while h.node.get_clock().now().nanoseconds != target:
        assert time.monotonic() < end, f"the node's clock never showed {seconds}"
        pub.publish(msg)
        time.sleep(0.02)


def test_a_refused_frame_resets_nothing_and_fresh_ids_are_the_lowest_never_used(harness, tmp_path):
    from PIL import Image as PILImage
    _, labels0 = _scene(0)
    png = tmp_path / "00000.png"
    PILImage.fromarray((labels0 * 3).astype(np.uint8)).save(png)  # ids 3 and 6
    h = harness(initial_mask=str(png))
    h.send(h.image_msg(_scene(0)[0], 50.0))
    tiny = h.image_msg(np.zeros((4, 4, 3), np.uint8), 10.0)  # another size and an older stamp
    h.send(tiny)
    c = h.node.counters()
    assert c["dropped"] == {"bad_frame": 1} and c["resets"] == 0 and "too small" in h.node.last_error
    h.send(h.image_msg(_scene(1)[0], 50.1))
    assert [o.id for o in _by_stamp(h.results, 50.1)[0].objects] == [3, 6]
    future = h.ask_then_send(h.add, AddObjects.Request(prompts=[_prompt(65535, box=(20, 40, 60, 80))]),
                             h.image_msg(_scene(2)[0], 50.2))
    assert future.result().success and list(future.result().ids) == [65535], future.result().message
    future = h.ask_then_send(h.add, AddObjects.Request(prompts=[_prompt(0, box=(90, 20, 130, 60))]),
                             h.image_msg(_scene(3)[0], 50.3))
    assert future.result().success and list(future.result().ids) == [1], future.result().message


def test_clock_jumping_back_under_sim_time_resets_once_and_tracking_goes_on(harness, tmp_path):
    """A looping bag with --clock: /clock and the image stamps go back, in either order."""
    from PIL import Image as PILImage
    from rosgraph_msgs.msg import Clock
    rgb0, labels0 = _scene(0)
    png = tmp_path / "00000.png"
    PILImage.fromarray((labels0 * 3).astype(np.uint8)).save(png)  # ids 3 and 6
    h = harness(use_sim_time=True, initial_mask=str(png))
    clock = h.client.create_publisher(Clock, "/clock", 10)
    h.wait_for(lambda: clock.get_subscription_count() > 0, "the node's /clock subscription")

    def loop(start):
        ids = []
        for k in range(3):
            _publish_clock(h, clock, start + k / 10)
            h.send(h.image_msg(_scene(k)[0], start + k / 10))
            ids.append([o.id for o in _by_stamp(h.results, start + k / 10)[0].objects])
        assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 2, ids
        return ids[0]

    assert loop(100.0) == [3, 6]
    # 1) /clock goes back first: the node resets before the next frame, once
    _publish_clock(h, clock, 10.0)
    h.wait_for(lambda: h.node.counters()["clock_jump_pending"], "the clock jump to be seen")
    second = loop(10.0)
    assert h.node.counters()["resets"] == 1
    assert not set(second) & {3, 6}  # seeded again from initial_mask, with fresh ids
    # 2) a frame with an older stamp comes before the clock: it resets the tracker; the clock jump
    #    that follows must not reset again (that would drop the objects just seeded)
    h.send(h.image_msg(rgb0, 5.0))
    third = [o.id for o in _by_stamp(h.results, 5.0)[0].objects]
    assert h.node.counters()["resets"] == 2 and len(third) == 2 and not set(third) & set(second)
    _publish_clock(h, clock, 5.0)
    h.wait_for(lambda: h.node.counters()["clock_jump_pending"], "the clock jump to be seen")
    for k in (1, 2):
        _publish_clock(h, clock, 5.0 + k / 10)
        h.send(h.image_msg(_scene(k)[0], 5.0 + k / 10))
        assert [o.id for o in _by_stamp(h.results, 5.0 + k / 10)[0].objects] == third
    c = h.node.counters()
    assert c["resets"] == 2 and c["processed"] == 9 and not c["dropped"]


def test_camera_info_of_another_size_is_reported_and_frames_still_processed(harness):
    from sensor_msgs.msg import CameraInfo
    h = harness(use_camera_info=True)
    info_pub = h.client.create_publisher(CameraInfo, "camera_info", 10)
    h.wait_for(lambda: info_pub.get_subscription_count() > 0, "the camera_info subscription")

    def send_info(width, height):
        info = CameraInfo(width=width, height=height)
        end = time.monotonic() + 20
        while h.node._camera_info is None or h.node._camera_info.width != width:
            assert time.monotonic() < end, "camera_info never arrived"
            info_pub.publish(info)
            time.sleep(0.02)

    send_info(640, 480)
    h.send(h.image_msg(_scene(0)[0], 1.0))
    h.send(h.image_msg(_scene(1)[0], 2.0))
    assert h.node.counters()["processed"] == 2 and not h.node.counters()["dropped"]
    assert f"camera_info is 640x480 but the image is {W}x{H}" in h.node.last_error
    h.wait_for(lambda: any(d.status[0].level == DiagnosticStatus.WARN and "camera_info" in d.status[0].message for d in h.diags),
               "a WARN status naming camera_info on /diagnostics")
    send_info(W, H)  # the right camera_info: the warning ends
    h.send(h.image_msg(_scene(2)[0], 3.0))
    assert h.node._camera_info_mismatch is None and h.node.counters()["processed"] == 3


def _clean_env():
    """The environment of a fresh shell where nothing was sourced (no ROS setup.bash, no
    workspace, none of what the venv's interpreter set up for itself and its children)."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR") if k in os.environ}
    env["ROS_DOMAIN_ID"] = str(DOMAIN_ID)
    # This checkout's code (the venv's `hqsmem` script imports the tree it was installed from).
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return env


def _hqsmem_command():
    import shutil
    import sys
    script = shutil.which("hqsmem", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "hqsmem_ros.cli"]  # the same main()


def test_hqsmem_node_command_starts_with_nothing_sourced(tmp_path):
    """`hqsmem node --config config/track.yaml` from a plain shell: a frame in, a label image out."""
    import signal
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(_hqsmem_command() + ["node", "--config", os.path.join(root, "config", "track.yaml")],
                            env=_clean_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    ctx = Context()
    rclpy.init(context=ctx, domain_id=DOMAIN_ID)
    node = rclpy.create_node("plain_shell_client", context=ctx)
    masks = []
    node.create_subscription(Image, "/hqsmem_node/masks", masks.append, 10)
    pub = node.create_publisher(Image, "image", 10)
    prompts = node.create_publisher(ObjectPromptArray, "/hqsmem_node/prompts", 10)
    try:
        end = time.monotonic() + 60
        while (pub.get_subscription_count() == 0 or node.count_publishers("/hqsmem_node/masks") == 0
               or prompts.get_subscription_count() == 0):
            assert time.monotonic() < end and proc.poll() is None, "hqsmem node did not come up"
            time.sleep(0.05)
        _spin_some(node, ctx, 0.5)
        _, labels0 = _scene(0)
        prompts.publish(ObjectPromptArray(prompts=[_prompt(0, labels0, 1)]))
        _spin_some(node, ctx, 0.3)
        h = Harness.__new__(Harness)  # only for image_msg()
        sent = 0
        while not any((ic.mask_from_msg(m) == 1).any() for m in masks):
            assert time.monotonic() < end, f"no label image with the object after {sent} frames"
            pub.publish(h.image_msg(_scene(sent % 20)[0], 5.0 + sent))
            sent += 1
            _spin_some(node, ctx, 0.3)
        m = masks[-1]
        assert (m.encoding, m.width, m.height) == ("mono16", W, H)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    assert proc.returncode == 0, out


def _random_weights_params(tmp_path):
    import yaml
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"pipeline": {
        "features": {"type": "dino", "random_weights": True, "input_size": 28}}}}}))
    return path


def test_node_refuses_random_weights_unless_allowed(tmp_path):
    import subprocess
    params = _random_weights_params(tmp_path)
    res = subprocess.run(_hqsmem_command() + ["node", "--config", str(params)], env=_clean_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert res.returncode != 0, res.stdout
    assert "pipeline.features (dino)" in res.stdout and "allow_random_weights" in res.stdout, res.stdout


def test_random_weights_run_when_explicitly_allowed_with_a_warning(harness, capfd):
    pytest.importorskip("timm", reason="the dino features need the [models] extra")
    h = harness(**{"allow_random_weights": True, "pipeline.features.type": "dino",
                   "pipeline.features.random_weights": True, "pipeline.features.input_size": 28})
    assert h.node.pipeline.stats()["features"].startswith("dino")
    assert "RANDOM WEIGHTS in pipeline.features (dino)" in capfd.readouterr().err
    h.send(h.image_msg(_scene(0)[0], 1.0))
    assert h.node.counters()["processed"] == 1
    h.wait_for(lambda: any(d.status[0].level == DiagnosticStatus.WARN and "random weights" in d.status[0].message
                           for d in h.diags), "a WARN status about random weights")


def test_prompts_file_starts_and_removes_objects_like_hqsmem_bag(harness, tmp_path):
    prompts = tmp_path / "objects.yaml"
    prompts.write_text(
        "prompts:\n"
        "  - {id: 5, frame: 0, box: [18, 38, 62, 82], label: crate}\n"
        "  - {id: 9, stamp: 70.1, box: [88, 8, 132, 52]}\n"
        "remove:\n"
        "  - {id: 5, frame: 3}\n")
    h = harness(prompts_file=str(prompts))
    for k, stamp in enumerate([70.0, 70.1, 70.2, 70.3, 70.4]):
        h.send(h.image_msg(_scene(k)[0], stamp))
    ids = [[o.id for o in _by_stamp(h.results, s)[0].objects] for s in (70.0, 70.1, 70.2, 70.3, 70.4)]
    assert ids == [[5], [5, 9], [5, 9], [9], [9]]
    first = _by_stamp(h.results, 70.0)[0].objects[0]
    assert first.label == "crate" and first.visible and first.area > 800
    assert h.node.counters()["processed"] == 5 and not h.node.counters()["dropped"]


def test_invalid_prompts_file_stops_start_up_with_its_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompts:\n  - {id: 1, box: [0, 0, 10, 10]}\n")  # neither frame nor stamp
    ctx = Context()
    rclpy.init(context=ctx, domain_id=DOMAIN_ID)
    try:
        with pytest.raises(ConfigError, match="bad.yaml"):
            HQSMemNode("bad_prompts", context=ctx, parameter_overrides=[Parameter("prompts_file", value=str(bad))])
    finally:
        rclpy.shutdown(context=ctx)


def test_model_parameters_are_declared_from_the_models_settings_with_meaning_range_and_choices():
    from hqsmem_ros.core import registry
    from hqsmem_ros.core.settings import settings_info
    from hqsmem_ros.models.flow_tracker import FlowSettings
    infos = {i.name: i for i in settings_info(FlowSettings)}
    ctx = Context()
    rclpy.init(context=ctx, domain_id=DOMAIN_ID)
    try:
        # 1 for a number and [1, 3] for two numbers, as a YAML file gives them
        node = HQSMemNode("settings_node", context=ctx, parameter_overrides=[
            Parameter("pipeline.tracker.anchor_weight", value=1),
            Parameter("pipeline.tracker.redetect_area_range", value=[1, 3]),
            Parameter("pipeline.refiner.lines_to_background", value="")])
        try:
            declared = {n for n in node._parameters if n.startswith("pipeline.tracker.")}
            assert declared == {f"pipeline.tracker.{k}" for k in infos} | {"pipeline.tracker.type"}
            d = node.describe_parameter("pipeline.tracker.anchor_weight")
            assert d.description.startswith(infos["anchor_weight"].description) and d.read_only
            assert (d.floating_point_range[0].from_value, d.floating_point_range[0].to_value) == (0.0, 1.0)
            assert d.additional_constraints == "a number in [0, 1]"
            d = node.describe_parameter("pipeline.tracker.flow_preset")
            assert d.additional_constraints == "one of ultrafast, fast, medium" and d.description.startswith("DIS")
            d = node.describe_parameter("pipeline.tracker.match_size")
            assert d.integer_range[0].from_value == 1
            d = node.describe_parameter("pipeline.memory_capacity")
            assert d.integer_range[0].from_value == 1 and d.description.startswith("Smart memory size K")
            assert node.get_parameter("pipeline.tracker.anchor_weight").value == 1.0
            assert node.config.tracker["anchor_weight"] == 1.0
            assert node.config.tracker["redetect_area_range"] == [1.0, 3.0]
            assert node.config.refiner["lines_to_background"] is None  # "" leaves it unset
            assert node.pipeline.tracker.anchor_weight == 1.0 and node.pipeline.refiner.lines_to_background is None
        finally:
            node.destroy_node()
        # What the Settings refuse stops the start with the message `hqsmem track` gives.
        for bad in ({"pipeline.tracker.colour_bins": [4, 32]}, {"pipeline.tracker.anchor_weight": 2.0},
                    {"pipeline.features.context_width": 0}):
            (name, value), = bad.items()
            kind, key = name.split(".")[1:]
            with pytest.raises(ConfigError) as built:
                registry.build(kind, {"type": {"tracker": "flow", "features": "histogram"}[kind], key: value})
            with pytest.raises(ConfigError) as started:
                HQSMemNode("bad_settings", context=ctx, parameter_overrides=[Parameter(name, value=value)])
            assert str(started.value) == str(built.value) and key in str(started.value)
    finally:
        rclpy.shutdown(context=ctx)


def test_intake_group_starts_one_callback_at_a_time_and_release_lets_the_next_start():
    from hqsmem_ros.ros.intake import OrderedIntakeGroup as _OrderedIntakeGroup
    group, sub = _OrderedIntakeGroup(), object()
    assert group.can_execute(sub) and group.beginning_execution(sub)
    assert not group.can_execute(sub) and not group.beginning_execution(sub)  # one at a time
    assert group.release() and group.can_execute(sub)  # the processing callback let go early
    assert not group.release()  # released once only
    started = []

    def second():  # another executor thread starts the next callback
        started.append(group.beginning_execution(sub))
        group.ending_execution(sub)

    t = threading.Thread(target=second)
    t.start()
    t.join()
    assert started == [True] and group.can_execute(sub)
    # the first callback returning later must not release a hold it gave up
    assert group.beginning_execution(sub)  # held by this thread now
    other = threading.Thread(target=lambda: group.ending_execution(sub))
    other.start()
    other.join()
    assert not group.can_execute(sub)
    group.ending_execution(sub)
    assert group.can_execute(sub)


def test_a_model_blocks_precision_is_a_declared_parameter_that_reaches_the_model():
    ctx = Context()
    rclpy.init(context=ctx, domain_id=DOMAIN_ID)
    try:
        node = HQSMemNode("block_precision", context=ctx, parameter_overrides=[
            Parameter("allow_random_weights", value=True), Parameter("pipeline.precision", value="bf16"),
            Parameter("pipeline.refiner.type", value="sam_hq"), Parameter("pipeline.refiner.random_weights", value=True),
            Parameter("pipeline.refiner.precision", value="fp32")])
        try:
            assert node.pipeline.refiner.precision == "fp32" and node.config.model_precision("refiner") == "fp32"
            d = node.describe_parameter("pipeline.refiner.precision")
            assert d.read_only and d.description.startswith("This model's own precision")
            assert "pipeline.tracker.precision" not in node._parameters  # flow has no weights: not declared
        finally:
            node.destroy_node()
        for overrides, words in [({"pipeline.refiner.type": "sam_hq", "pipeline.refiner.precision": "fp8"},
                                  "refiner.precision must be one of fp32, fp16, bf16"),
                                 ({"pipeline.refiner.precision": "bf16"},
                                  "refiner.precision 'bf16': refiner 'watershed' has no weights")]:
            with pytest.raises(ConfigError) as e:
                HQSMemNode("bad_block_precision", context=ctx, parameter_overrides=[
                    Parameter(k, value=v) for k, v in overrides.items()])
            assert words in str(e.value), str(e.value)
    finally:
        rclpy.shutdown(context=ctx)


def test_a_native_crash_in_the_node_process_prints_every_threads_stack():
    """A segfault in DDS or rclpy's C code must leave the Python stacks in the launch log, not a
    bare exit -11: `hqsmem node` enables faulthandler first (here: a config error returns, then a
    native crash in the same process)."""
    import signal
    import subprocess
    import sys
    code = ("import ctypes, os, sys\n"
            "from hqsmem_ros.ros.main import main\n"
            "assert main(['--config', os.devnull + '.missing.yaml']) == 2\n"
            "ctypes.string_at(0)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stderr)
    assert "Fatal Python error: Segmentation fault" in r.stderr and "string_at" in r.stderr, r.stderr
