"""The node's depth/3D mode and its lifecycle node, over real rclpy and Fast DDS.

The synthetic RGB-D camera (hqsmem_ros.tools.synthetic_rgbd_camera) publishes colour, aligned
depth and camera_info with exact 3D truth; the node tracks its objects (seeded by the first
frame's label image) and publishes 3D per object, ~/points and /diagnostics. Every wait is for a
condition, with a generous deadline (no timing assumptions).
"""
import math
import os
import weakref

import numpy as np
import pytest
from conftest import Collector

rclpy = pytest.importorskip("rclpy", reason="ROS 2 not installed: run scripts/setup_ros.sh")
from rclpy.context import Context  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from lifecycle_msgs.msg import State, Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField  # noqa: E402

from hqsmem_ros.core.depth3d import unpack_points  # noqa: E402
from hqsmem_ros.io import image_codec as ic  # noqa: E402
from hqsmem_ros.msg import TrackedObjectArray  # noqa: E402
from hqsmem_ros.ros.lifecycle import HQSMemLifecycleNode  # noqa: E402
from hqsmem_ros.ros.node import HQSMemNode  # noqa: E402
from hqsmem_ros.ros.spinning import BackgroundSpinner  # noqa: E402
from hqsmem_ros.tools.synthetic_rgbd_camera import SyntheticRGBDCamera, camera_info_msg  # noqa: E402

DOMAIN_ID = 1 + (os.getpid() + 77) % 200
W, H = 320, 240
LONG = 90.0  # deadline for anything the loaded machine must finish


def _secs(stamp):
    return stamp.sec + stamp.nanosec * 1e-9


def _label_png(tmp_path, label):
    from PIL import Image as PILImage
    path = tmp_path / "initial.png"
    PILImage.fromarray(label.astype(np.uint8)).save(path)
    return str(path)


class Rig(Collector):
    """A node (plain or lifecycle) and a client node on a private domain."""

    def __init__(self, node_cls, params, name="hqsmem_node"):
        super().__init__()
        self.ctx = Context()
        rclpy.init(context=self.ctx, domain_id=DOMAIN_ID)
        self.node = node_cls(name, context=self.ctx, parameter_overrides=[
            Parameter(k, value=v) for k, v in params.items()])
        self.client = rclpy.create_node("depth_test_client", context=self.ctx)
        self.executor = MultiThreadedExecutor(num_threads=6, context=self.ctx)
        self.executor.add_node(self.node)
        self.executor.add_node(self.client)
        self.results, self.masks, self.points, self.diags = [], [], [], []
        ns = f"/{name}"
        self.client.create_subscription(TrackedObjectArray, f"{ns}/objects", self._on(self.results), 200)
        self.client.create_subscription(Image, f"{ns}/masks", self._on(self.masks), 200)
        self.client.create_subscription(PointCloud2, f"{ns}/points", self._on(self.points), 200)
        self.client.create_subscription(DiagnosticArray, "/diagnostics", self._on(self.diags), 50)
        self.spinner = BackgroundSpinner(self.executor).start()

    def close(self):
        self.spinner.stop()
        self.client.destroy_node()
        self.node.destroy_node()
        rclpy.shutdown(context=self.ctx)

    def by_stamp(self, results):
        return {round(_secs(r.header.stamp), 6): r for r in results}

    def wait_subscribed(self, pubs, what):
        self.wait_for(lambda: all(p.get_subscription_count() > 0 for p in pubs), what, LONG)


def _camera(ctx, **params):
    base = dict(width=W, height=H, rate=10.0, frames=20, wait_for_subscribers=1)
    base.update(params)
    return SyntheticRGBDCamera(context=ctx, parameter_overrides=[Parameter(k, value=v) for k, v in base.items()])


def _run_camera(rig, cam, frames):
    """Publish the camera's frames one by one (depth first, as the camera does), each once the
    node's outputs of the one before arrived: the publishers' KEEP_LAST histories never
    overwrite an output the client has not taken yet, whatever the machine's load."""
    rig.executor.add_node(cam)
    pubs = [rig.node.objects_pub, rig.node.masks_pub] + ([rig.node.points_pub] if rig.node.points_pub else [])
    rig.wait_subscribed(pubs, "the client to match the node's outputs")
    rig.wait_subscribed([cam.pub_image, cam.pub_depth, cam.pub_depth_info], "the node to match the camera")
    points = rig.node.points_pub is not None and rig.node.get_parameter("publish_points").value
    sent_depth = 0
    for k in range(frames):
        image, info, depth, depth_info = cam.messages(k)
        if depth is not None:
            cam.pub_depth_info.publish(depth_info)
            cam.pub_depth.publish(depth)
            sent_depth += 1
            # Colour and depth are separate topics with no order between them: the colour frame
            # goes once the node holds this depth frame and its camera_info, whatever the load.
            rig.wait_for(lambda: rig.node.counters()["depth"].get("pairing.depth_received", 0) >= sent_depth
                         and rig.node.session.depth.intrinsics is not None, f"the depth of frame {k}", LONG)
        cam.pub_info.publish(info)
        cam.pub_image.publish(image)
        stamp = (image.header.stamp.sec, image.header.stamp.nanosec)

        def arrived(store):
            return any((m.header.stamp.sec, m.header.stamp.nanosec) == stamp for m in store)
        rig.wait_for(lambda: arrived(rig.results) and arrived(rig.masks), f"the outputs of frame {k}", LONG)
        if points and arrived(rig.results) and rig.results[-1].status_3d == "":
            rig.wait_for(lambda: arrived(rig.points), f"the cloud of frame {k}", LONG)


DEPTH = {"use_depth": True, "qos_reliability": "reliable", "qos_depth": 100, "frame_queue_size": 100}


@pytest.mark.parametrize("encoding,decimation", [("16UC1", 1), ("32FC1", 3)])
def test_3d_per_object_matches_the_truth_ids_match_the_masks_and_points_add_up(tmp_path, encoding, decimation):
    frames = 12
    probe = _camera_data(frames)
    rig = Rig(HQSMemNode, dict(DEPTH, initial_mask=_label_png(tmp_path, probe[0].label), depth_wait=5.0,
                               points_decimation=decimation))
    try:
        cam = _camera(rig.ctx, frames=frames, depth_encoding=encoding)
        _run_camera(rig, cam, frames)
        results, masks, clouds = rig.by_stamp(rig.results), rig.by_stamp(rig.masks), rig.by_stamp(rig.points)
        errors = []
        for k in range(frames):
            t = round(cam.stamp_of(k), 6)
            arr = results[t]
            assert arr.status_3d == "" and arr.frame_id_3d == "camera_color_optical_frame"
            assert abs(_secs(arr.depth_stamp) - cam.stamp_of(k)) < 1e-6
            label = np.frombuffer(bytes(masks[t].data), "<u2").reshape(H, W)
            visible = {o.id for o in arr.objects if o.visible}
            assert visible == set(np.unique(label)) - {0}  # the ids of ~/masks
            cloud = clouds[t]
            assert cloud.header.frame_id == "camera_color_optical_frame"
            assert [(f.name, f.offset, f.datatype, f.count) for f in cloud.fields] == [
                ("x", 0, PointField.FLOAT32, 1), ("y", 4, PointField.FLOAT32, 1),
                ("z", 8, PointField.FLOAT32, 1), ("id", 12, PointField.UINT16, 1)]
            assert cloud.point_step == 16 and cloud.height == 1
            pts = unpack_points(bytes(cloud.data))
            assert cloud.width == len(pts)
            for o in arr.objects:
                truth = cam.truth(k)[o.id]
                assert o.has_position_3d, o.position_3d_status
                assert o.position_3d_status == "" and o.inlier_depth_points <= o.valid_depth_points
                assert o.valid_depth_points <= o.area
                errors.append(math.dist((o.position.x, o.position.y, o.position.z), truth.centre))
                true_size = np.subtract(truth.box_max, truth.box_min)
                np.testing.assert_allclose((o.size.x, o.size.y), true_size[:2], atol=0.06)
                mine = pts[pts["id"] == o.id]
                assert len(mine) == -(-o.inlier_depth_points // decimation)  # every N-th point
                assert abs(np.median(mine["z"]) - o.position.z) < 0.05
            assert set(np.unique(pts["id"])) == {o.id for o in arr.objects}
        assert len(errors) == 3 * frames and np.median(errors) < 0.03, np.median(errors)
        depth = rig.node.counters()["depth"]
        assert depth["frames_3d"] == frames and depth["pairing.paired"] == frames
    finally:
        rig.close()


def _camera_data(frames):
    from hqsmem_ros.data.synth_rgbd import make_rgbd
    return make_rgbd(0, (W, H), frames, 3)


def test_unpaired_frames_keep_2d_results_and_are_counted_by_reason(tmp_path):
    """Depth frames 4, 9 and 14 are left out, and the stream stops after frame 13: frames 4, 9,
    14, 15 have no depth within the tolerance; 16.. are more than depth_stale_after newer than
    the last depth frame. Every frame still gets its 2D result."""
    frames = 20
    probe = _camera_data(frames)
    rig = Rig(HQSMemNode, dict(DEPTH, initial_mask=_label_png(tmp_path, probe[0].label), depth_wait=3.0,
                               depth_stale_after=0.25, depth_tolerance=0.01, publish_points=False))
    try:
        cam = _camera(rig.ctx, frames=frames, drop_depth_every=5, depth_stop_after=14, depth_stamp_offset=0.004)
        _run_camera(rig, cam, frames)
        results = rig.by_stamp(rig.results)
        want = {4: "outside_tolerance", 9: "outside_tolerance", 14: "outside_tolerance",
                15: "outside_tolerance", **{k: "depth_stale" for k in range(16, frames)}}
        for k in range(frames):
            arr = results[round(cam.stamp_of(k), 6)]
            assert arr.status_3d == want.get(k, ""), k
            assert len(arr.objects) == 3 and all(o.visible for o in arr.objects)  # 2D kept
            if k in want:
                assert arr.frame_id_3d == "" and _secs(arr.depth_stamp) == 0.0
                assert all(not o.has_position_3d and o.position_3d_status == want[k] and math.isnan(o.position.z)
                           for o in arr.objects)
            else:
                assert abs(_secs(arr.depth_stamp) - cam.stamp_of(k) - 0.004) < 1e-6
                assert all(o.has_position_3d for o in arr.objects)
        c = rig.node.counters()
        assert c["processed"] == frames and sum(c["dropped"].values()) == 0
        assert c["depth"]["no_3d.outside_tolerance"] == 4 and c["depth"]["no_3d.depth_stale"] == 4
        assert c["depth"]["frames_3d"] == 12 and c["depth"]["pairing.depth_received"] == 12
        assert rig.points == []  # publish_points: false
        diag = _diag_after(rig, lambda v: v.get("depth.no_3d.depth_stale") == "4")
        assert diag.level == DiagnosticStatus.WARN and "depth_stale" in diag.message
    finally:
        rig.close()


def _diag_after(rig, predicate):
    def found():
        for arr in rig.diags:
            for st in arr.status:
                if predicate({kv.key: kv.value for kv in st.values}):
                    return st
        return None
    rig.wait_for(lambda: found() is not None, "a /diagnostics message with the counts", LONG)
    return found()


def _depth_msg(values, encoding, stamp, frame_id="depth_optical"):
    values = np.ascontiguousarray(values)
    msg = Image(encoding=encoding, height=values.shape[0], width=values.shape[1], step=values.strides[0],
                is_bigendian=False)
    msg.data = values.astype(values.dtype.newbyteorder("<")).tobytes()
    msg.header.frame_id = frame_id
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(round(stamp * 1e9)), 1_000_000_000)
    return msg


def test_bad_depth_inputs_are_reported_and_counted_and_2d_continues(tmp_path):
    data = _camera_data(1)[0]
    rig = Rig(HQSMemNode, dict(DEPTH, initial_mask=_label_png(tmp_path, data.label), publish_points=False))
    try:
        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        pubs = {t: rig.client.create_publisher(typ, t, qos) for t, typ in
                (("image", Image), ("depth", Image), ("depth/camera_info", CameraInfo))}
        rig.wait_subscribed(list(pubs.values()) + [rig.node.objects_pub], "discovery")
        d3 = rig.node.session.depth
        counts = lambda: rig.node.counters()["depth"]  # noqa: E731
        rgb = data.rgb

        def frame(stamp):
            msg = ic.fill_image_msg(Image(), ic.rgb_to_fields(rgb))
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(round(stamp * 1e9)), 1_000_000_000)
            before = len(rig.results)
            pubs["image"].publish(msg)
            rig.wait_for(lambda: len(rig.results) > before, "the result", LONG)
            return rig.results[-1]

        def depth(values, encoding, stamp):
            n = counts()["pairing.depth_received"] + counts()["bad_depth"]
            pubs["depth"].publish(_depth_msg(values, encoding, stamp))
            rig.wait_for(lambda: counts()["pairing.depth_received"] + counts()["bad_depth"] > n, "the depth", LONG)

        zero_f = camera_info_msg(W, H, "depth_optical", 10.0)
        zero_f.k = [0.0, 0.0, 159.5, 0.0, 0.0, 119.5, 0.0, 0.0, 1.0]
        pubs["depth/camera_info"].publish(zero_f)
        rig.wait_for(lambda: counts()["bad_camera_info"] == 1, "the camera_info refused", LONG)
        depth(data.depth_mm, "16UC1", 10.0)
        r = frame(10.0)
        assert r.status_3d == "no_camera_info" and "focal length" in rig.node.last_error
        pubs["depth/camera_info"].publish(camera_info_msg(W, H, "depth_optical", 10.0))
        rig.wait_for(lambda: d3.intrinsics is not None, "the good camera_info", LONG)
        assert frame(10.0).status_3d == ""  # the same depth frame pairs now

        depth(data.depth_mm[::2, ::2], "16UC1", 11.0)  # another size than the colour image
        assert frame(11.0).status_3d == "size_mismatch" and "registered" in rig.node.last_error
        depth(data.depth_m.view(np.uint8).reshape(H, W, 4)[..., :3], "bgr8", 12.0)  # not a depth encoding
        assert counts()["bad_depth"] == 1 and "unsupported depth encoding 'bgr8'" in d3.last_error
        assert frame(12.0).status_3d == "outside_tolerance"  # the refused frame was never paired
        depth(np.zeros((H, W), np.uint16), "16UC1", 13.0)
        assert frame(13.0).status_3d == "no_valid_depth"
        depth(np.full((H, W), np.nan, np.float32), "32FC1", 14.0)
        r = frame(14.0)
        assert r.status_3d == "no_valid_depth" and all(not o.has_position_3d for o in r.objects)
        r = frame(16.0)  # the depth stream stopped 2 s ago
        assert r.status_3d == "depth_stale" and "stale" in rig.node.last_error
        assert all(o.visible for o in r.objects) and len(rig.results) == 7  # 2D all along
        c = rig.node.counters()
        assert c["processed"] == 7 and not c["dropped"]
        assert {k: c["depth"][k] for k in ("frames_3d", "no_3d.no_camera_info", "no_3d.size_mismatch",
                                           "no_3d.outside_tolerance", "no_3d.no_valid_depth", "no_3d.depth_stale",
                                           "bad_depth", "bad_camera_info")} == {
            "frames_3d": 1, "no_3d.no_camera_info": 1, "no_3d.size_mismatch": 1, "no_3d.outside_tolerance": 1,
            "no_3d.no_valid_depth": 2, "no_3d.depth_stale": 1, "bad_depth": 1, "bad_camera_info": 1}
        diag = _diag_after(rig, lambda v: v.get("depth.no_3d.depth_stale") == "1")
        assert diag.level == DiagnosticStatus.WARN and diag.message
    finally:
        rig.close()


# ---------------------------------------------------------------------------------------------
# Lifecycle


def _transition(rig, change, tid):
    req = ChangeState.Request()
    req.transition.id = tid
    fut = change.call_async(req)
    rig.wait_for(fut.done, f"transition {tid}", LONG)
    return fut.result().success


def _state(rig, get):
    fut = get.call_async(GetState.Request())
    rig.wait_for(fut.done, "get_state", LONG)
    return fut.result().current_state.id


def test_lifecycle_configure_activate_deactivate_cleanup_over_the_services(tmp_path):
    data = _camera_data(1)[0]
    rig = Rig(HQSMemLifecycleNode, dict(initial_mask=_label_png(tmp_path, data.label), qos_reliability="reliable"),
              name="hqsmem_lc")
    try:
        change = rig.client.create_client(ChangeState, "/hqsmem_lc/change_state")
        get = rig.client.create_client(GetState, "/hqsmem_lc/get_state")
        assert change.wait_for_service(timeout_sec=LONG) and get.wait_for_service(timeout_sec=LONG)
        assert _state(rig, get) == State.PRIMARY_STATE_UNCONFIGURED and rig.node.pipeline is None
        image_pub = rig.client.create_publisher(Image, "image", QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))

        assert _transition(rig, change, Transition.TRANSITION_CONFIGURE)
        assert _state(rig, get) == State.PRIMARY_STATE_INACTIVE
        pipeline = weakref.ref(rig.node.pipeline)
        assert pipeline() is not None and rig.node.objects_pub is not None
        assert image_pub.get_subscription_count() == 0  # inactive: no image subscription

        def frame(stamp):
            msg = ic.fill_image_msg(Image(), ic.rgb_to_fields(data.rgb))
            msg.header.stamp.sec = stamp
            before = len(rig.results)
            image_pub.publish(msg)
            rig.wait_for(lambda: len(rig.results) > before, "a result", LONG)
            return rig.results[-1]

        assert _transition(rig, change, Transition.TRANSITION_ACTIVATE)
        assert _state(rig, get) == State.PRIMARY_STATE_ACTIVE
        rig.wait_for(lambda: image_pub.get_subscription_count() > 0 and rig.node.objects_pub.get_subscription_count() > 0,
                     "the image subscription", LONG)
        assert [o.id for o in frame(1).objects] == [1, 2, 3]

        assert _transition(rig, change, Transition.TRANSITION_DEACTIVATE)
        assert _state(rig, get) == State.PRIMARY_STATE_INACTIVE
        rig.wait_for(lambda: image_pub.get_subscription_count() == 0, "the image subscription to go", LONG)
        assert pipeline() is rig.node.pipeline  # models kept
        assert rig.node.counters()["processed"] == 1

        assert _transition(rig, change, Transition.TRANSITION_ACTIVATE)
        rig.wait_for(lambda: image_pub.get_subscription_count() > 0, "the image subscription again", LONG)
        arr = frame(2)
        assert [o.id for o in arr.objects] == [1, 2, 3] and arr.frame_index == 1  # the same tracks go on
        c = rig.node.counters()
        assert c["received"] == c["processed"] + sum(c["dropped"].values()) == 2

        assert _transition(rig, change, Transition.TRANSITION_DEACTIVATE)
        assert _transition(rig, change, Transition.TRANSITION_CLEANUP)
        assert _state(rig, get) == State.PRIMARY_STATE_UNCONFIGURED
        assert rig.node.pipeline is None and rig.node.session is None
        assert pipeline() is None  # nothing holds the models any more
        assert rig.node.counters()["processed"] == 2  # the counts outlive the session

        assert _transition(rig, change, Transition.TRANSITION_CONFIGURE)  # and back again
        assert rig.node.pipeline is not None
        assert _transition(rig, change, Transition.TRANSITION_INACTIVE_SHUTDOWN)
        assert _state(rig, get) == State.PRIMARY_STATE_FINALIZED and rig.node.pipeline is None
    finally:
        rig.close()


def test_lifecycle_deactivate_and_activate_while_frames_stream(tmp_path):
    """Deactivating destroys subscriptions while the executor may be building its wait set
    (rclpy raised InvalidHandle from the spinning thread then, ros2/rclpy#1284, and every
    later transition went unanswered): with frames streaming, every transition is answered
    and every frame received is a result or a counted drop."""
    import threading
    data = _camera_data(1)[0]
    rig = Rig(HQSMemLifecycleNode, dict(initial_mask=_label_png(tmp_path, data.label), qos_reliability="reliable"),
              name="hqsmem_lc_stream")
    stop = threading.Event()
    try:
        change = rig.client.create_client(ChangeState, "/hqsmem_lc_stream/change_state")
        assert change.wait_for_service(timeout_sec=LONG)
        image_pub = rig.client.create_publisher(Image, "image", QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        assert _transition(rig, change, Transition.TRANSITION_CONFIGURE)
        msg = ic.fill_image_msg(Image(), ic.rgb_to_fields(data.rgb))

        def stream():
            stamp = 0
            while not stop.wait(0.005):
                stamp += 1
                msg.header.stamp.sec = stamp
                image_pub.publish(msg)
        threading.Thread(target=stream, daemon=True).start()
        for cycle in range(12):  # without the fix: 3 of 4 runs here lost the spinning thread
            assert _transition(rig, change, Transition.TRANSITION_ACTIVATE), f"activate {cycle}"
            assert _transition(rig, change, Transition.TRANSITION_DEACTIVATE), f"deactivate {cycle}"
            assert rig.spinner.thread.is_alive()
        stop.set()
        c = rig.node.counters
        rig.wait_for(lambda: c()["received"] == c()["processed"] + sum(c()["dropped"].values()),
                     "every frame received to be a result or a counted drop", LONG)
        assert set(c()["dropped"]) <= {"deactivated", "replaced"}, c()["dropped"]
    finally:
        stop.set()
        rig.close()


@pytest.mark.parametrize("params,why", [
    ({"pipeline.device": "cuda"}, "CUDA"),
    ({"pipeline.tracker.type": "deaot", "pipeline.tracker.checkpoint": "/nonexistent/deaot.pth"}, "file not found"),
])
def test_lifecycle_configure_fails_with_the_reason_for_cuda_without_cuda_or_a_missing_checkpoint(params, why):
    import torch
    if why == "CUDA" and torch.cuda.is_available():  # a device this machine lacks
        params = {"pipeline.device": f"cuda:{torch.cuda.device_count()}"}
    rig = Rig(HQSMemLifecycleNode, params, name="hqsmem_lc_bad")
    try:
        change = rig.client.create_client(ChangeState, "/hqsmem_lc_bad/change_state")
        get = rig.client.create_client(GetState, "/hqsmem_lc_bad/get_state")
        assert change.wait_for_service(timeout_sec=LONG)
        assert _transition(rig, change, Transition.TRANSITION_CONFIGURE) is False
        assert _state(rig, get) == State.PRIMARY_STATE_UNCONFIGURED
        assert why in rig.node.last_error and rig.node.pipeline is None
    finally:
        rig.close()


def test_sequence_gaps_while_paused_are_not_losses():
    from hqsmem_ros.stream.accounting import SequenceGaps
    g = SequenceGaps()
    g.see(b"a", 1)
    g.see(b"a", 3)  # 2 lost
    g.pause()
    g.see(b"a", 10)  # 4..9 sent while nobody listened
    g.see(b"a", 12)  # 11 lost
    assert (g.gaps, g.paused_gaps) == (2, 6)


def test_node_without_depth_fills_no_3d_and_has_no_points_publisher():
    rig = Rig(HQSMemNode, {}, name="hqsmem_2d")
    try:
        assert rig.node.points_pub is None and rig.node.session.depth is None
        assert rig.node.count_publishers("/hqsmem_2d/points") == 0
        assert rig.node.count_subscribers("/depth") == 0 and rig.node.count_subscribers("/depth/camera_info") == 0
    finally:
        rig.close()


def test_hqsmem_node_lifecycle_flag_starts_unconfigured_and_configures_over_change_state():
    """`hqsmem node --lifecycle` as its own process: ~/get_state says unconfigured, configure over
    ~/change_state loads the models, SIGINT stops it with exit status 0."""
    import signal
    import subprocess
    import sys
    env = dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN_ID))
    proc = subprocess.Popen([sys.executable, "-m", "hqsmem_ros.ros.main", "--lifecycle", "--ros-args",
                             "-r", "__node:=lc_proc"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    rig = Collector()
    ctx = Context()
    rclpy.init(context=ctx, domain_id=DOMAIN_ID)
    node = rclpy.create_node("lc_proc_client", context=ctx)
    executor = MultiThreadedExecutor(num_threads=2, context=ctx)
    executor.add_node(node)
    spinner = BackgroundSpinner(executor).start()
    try:
        change = node.create_client(ChangeState, "/lc_proc/change_state")
        get = node.create_client(GetState, "/lc_proc/get_state")
        assert change.wait_for_service(timeout_sec=LONG) and get.wait_for_service(timeout_sec=LONG), proc.poll()
        assert _state(rig, get) == State.PRIMARY_STATE_UNCONFIGURED
        assert node.count_publishers("/lc_proc/objects") == 0
        assert _transition(rig, change, Transition.TRANSITION_CONFIGURE)
        assert _state(rig, get) == State.PRIMARY_STATE_INACTIVE
    finally:
        spinner.stop()
        node.destroy_node()
        rclpy.shutdown(context=ctx)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "lifecycle node: unconfigured" in out and "configured: models loaded" in out, out


def test_hqsmem_node_stops_cleanly_on_sigterm():
    """`ros2 launch` escalates to SIGTERM: the node stops as on Ctrl-C (its counters logged, exit
    status 0), not killed by the default handler or crashing in rclpy's signal thread."""
    import signal
    import subprocess
    import sys
    import time
    env = dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN_ID))
    proc = subprocess.Popen([sys.executable, "-m", "hqsmem_ros.ros.main", "--ros-args", "-r", "__node:=term_proc"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ctx = Context()
    rclpy.init(context=ctx, domain_id=DOMAIN_ID)
    node = rclpy.create_node("term_proc_client", context=ctx)
    try:
        end = time.monotonic() + LONG
        while node.count_publishers("/term_proc/objects") == 0:
            assert time.monotonic() < end and proc.poll() is None, "node process did not come up"
            time.sleep(0.05)
    finally:
        node.destroy_node()
        rclpy.shutdown(context=ctx)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopped: 0 frames received" in out, out
    assert "never retrieved" not in out, out  # no executor task left failing at exit
