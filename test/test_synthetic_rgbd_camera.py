"""The synthetic RGB-D camera over real DDS, with 3D from the tracker's masks against the truth."""
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy comes with scripts/setup_ros.sh")

from rclpy.context import Context  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from hqsmem_ros.core.depth3d import DEPTH_STALE, OUTSIDE_TOLERANCE, Depth3D, DepthParams  # noqa: E402
from hqsmem_ros.core.pipeline import HQSMemPipeline, ObjectPrompt  # noqa: E402
from hqsmem_ros.core.depth3d import pack_points  # noqa: E402
from hqsmem_ros.io import image_codec  # noqa: E402
from hqsmem_ros.ros.depth_msgs import add_depth_msg, pointcloud2_msg, set_camera_info_msg  # noqa: E402
from hqsmem_ros.ros.spinning import BackgroundSpinner  # noqa: E402
from hqsmem_ros.tools.synthetic_rgbd_camera import SyntheticRGBDCamera  # noqa: E402

FRAMES = 24


def _secs(msg):
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


def _run_camera(**params):
    ctx = Context()
    rclpy.init(context=ctx)
    overrides = [rclpy.parameter.Parameter(k, value=v) for k, v in
                 dict(width=320, height=240, frames=FRAMES, rate=60.0, **params).items()]
    cam = SyntheticRGBDCamera(context=ctx, parameter_overrides=overrides)
    listener = rclpy.create_node("rgbd_listener", context=ctx)
    got = {"image": [], "depth": [], "depth/camera_info": []}
    lock = threading.Condition()

    def keep(topic):
        def cb(msg):
            with lock:
                got[topic].append(msg)
                lock.notify_all()
        return cb

    qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    for topic, typ in (("image", Image), ("depth", Image), ("depth/camera_info", CameraInfo)):
        listener.create_subscription(typ, topic, keep(topic), qos)
    executor = MultiThreadedExecutor(num_threads=2, context=ctx)
    executor.add_node(cam)
    executor.add_node(listener)
    spinner = BackgroundSpinner(executor).start()
    try:
        cam.run()
        want = {"image": FRAMES, "depth": len(cam.depth_published), "depth/camera_info": len(cam.depth_published)}
        with lock:
            assert lock.wait_for(lambda: all(len(got[t]) == n for t, n in want.items()), 30), \
                {t: len(v) for t, v in got.items()}
    finally:
        spinner.stop()
        listener.destroy_node()
        cam.destroy_node()
        rclpy.shutdown(context=ctx)
    return cam, got


def _track_in_3d(cam, got, params):
    """What a session does: depth frames into the pairer in stamp order, each colour frame tracked
    by the real pipeline and measured in 3D."""
    d3 = Depth3D(params)
    set_camera_info_msg(d3, got["depth/camera_info"][0])
    depth = sorted(got["depth"], key=_secs)
    pipeline = HQSMemPipeline()
    out = []
    for k, img in enumerate(sorted(got["image"], key=_secs)):
        t = _secs(img)
        while depth and _secs(depth[0]) <= t + params.tolerance_s:
            add_depth_msg(d3, depth.pop(0))
        prompts = None
        if k == 0:
            label = cam.data[0].label
            prompts = [ObjectPrompt(int(i), mask=label == i) for i in np.unique(label) if i]
        result = pipeline.process(image_codec.image_to_rgb(img), stamp=t, prompts=prompts)
        out.append((result, d3.process(result, want_points=True)))
    return d3, out


def test_rgbd_camera_pairs_and_3d_matches_the_truth_with_dropped_depth_frames():
    cam, got = _run_camera(depth_encoding="16UC1", drop_depth_every=6, depth_stamp_offset=0.004)
    assert cam.depth_published == [k for k in range(FRAMES) if (k + 1) % 6]
    for m in got["depth"]:  # the depth on the wire is the scene's, bit for bit
        k = round((_secs(m) - 0.004 - cam.start_stamp) * cam.rate)
        assert m.encoding == "16UC1" and m.header.frame_id == "camera_color_optical_frame"
        np.testing.assert_array_equal(np.frombuffer(bytes(m.data), "<u2").reshape(240, 320), cam.data[k].depth_mm)
    info = got["depth/camera_info"][0]
    assert info.k[0] > 0 and info.k[2] == (320 - 1) / 2 and (info.width, info.height) == (320, 240)

    d3, out = _track_in_3d(cam, got, DepthParams(tolerance_s=0.01))
    errors = []
    for k, (result, f3) in enumerate(out):
        if (k + 1) % 6 == 0:
            assert f3.reason == OUTSIDE_TOLERANCE and f3.objects == []
            continue
        assert f3.reason == "" and abs(f3.depth_stamp - result.stamp - 0.004) < 1e-6
        assert [o.id for o in f3.objects] == [o.id for o in result.objects]  # the ids of ~/objects
        for o in f3.objects:
            truth = cam.truth(k)[o.id]
            assert o.has_position, o.reason
            assert 1.0 <= truth.distance <= 4.0
            errors.append(np.linalg.norm(np.subtract(o.position, truth.centre)))
        xyz, ids = f3.points
        assert set(np.unique(ids)) == {o.id for o in f3.objects}
    assert len(errors) == 3 * 20 and np.median(errors) < 0.03
    assert d3.counts["frames_3d"] == 20 and d3.counts["no_3d.outside_tolerance"] == 4
    assert d3.pairer.counts["depth_received"] == 20
    _point_cloud_over_dds(out[0][1])


def _point_cloud_over_dds(frame3d):
    """~/points as the node will publish it: PointCloud2 across DDS, read back by its fields."""
    from sensor_msgs.msg import PointCloud2
    from std_msgs.msg import Header
    xyz, ids = frame3d.points
    ctx = Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("cloud_check", context=ctx)
    got = []
    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(PointCloud2, "points", got.append, qos)
    pub = node.create_publisher(PointCloud2, "points", qos)
    header = Header(frame_id=frame3d.frame_id)
    header.stamp.sec = 1000
    msg = pointcloud2_msg(pack_points(xyz, ids), header)
    from rclpy.executors import SingleThreadedExecutor
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    try:
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            if pub.get_subscription_count():
                pub.publish(msg)
            executor.spin_once(timeout_sec=0.1)
        assert got, "no PointCloud2 received"
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    m = got[0]
    assert (m.height, m.width, m.point_step, m.header.frame_id) == (1, len(xyz), 16, "camera_color_optical_frame")
    fields = {f.name: (f.offset, f.datatype, f.count) for f in m.fields}
    assert fields == {"x": (0, 7, 1), "y": (4, 7, 1), "z": (8, 7, 1), "id": (12, 4, 1)}
    raw = np.frombuffer(bytes(m.data), np.uint8).reshape(m.width, m.point_step)
    for i, name in enumerate("xyz"):
        np.testing.assert_array_equal(raw[:, fields[name][0]:fields[name][0] + 4].copy().view("<f4").ravel(), xyz[:, i])
    np.testing.assert_array_equal(raw[:, 12:14].copy().view("<u2").ravel(), ids)



def test_a_depth_stream_that_stops_is_counted_outside_tolerance_then_stale():
    cam, got = _run_camera(depth_encoding="32FC1", depth_stop_after=10)
    assert len(got["depth"]) == 10 and got["depth"][0].encoding == "32FC1"
    d3, out = _track_in_3d(cam, got, DepthParams(tolerance_s=0.01, stale_after_s=0.09))
    reasons = [f3.reason for _, f3 in out]
    assert reasons == [""] * 10 + [OUTSIDE_TOLERANCE] * 5 + [DEPTH_STALE] * 9
    assert all(o.has_position for _, f3 in out[:10] for o in f3.objects)
    assert d3.counts["frames_3d"] + d3.counts["no_3d.outside_tolerance"] + d3.counts["no_3d.depth_stale"] == FRAMES


def test_rgbd_camera_writes_its_3d_truth_and_refuses_unknown_depth_encodings(tmp_path):
    import csv
    ctx = Context()
    rclpy.init(context=ctx)
    try:
        P = rclpy.parameter.Parameter
        cam = SyntheticRGBDCamera(context=ctx, parameter_overrides=[
            P("width", value=160), P("height", value=120), P("frames", value=3), P("out_dir", value=str(tmp_path))])
        cam.write_truth()
        rows = list(csv.DictReader(open(tmp_path / "truth3d.csv")))
        assert len(rows) == sum(len(cam.truth(k)) for k in range(3)) > 0
        for r in rows:
            t = cam.truth(int(r["frame"]))[int(r["id"])]
            assert abs(float(r["cz"]) - t.centre[2]) < 1e-5 and int(r["visible_pixels"]) == t.visible_pixels
        assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["00000.png", "00001.png", "00002.png"]
        cam.destroy_node()
        with pytest.raises(ValueError, match="depth_encoding must be one of 16UC1, 32FC1"):
            SyntheticRGBDCamera(context=ctx, parameter_overrides=[P("depth_encoding", value="8UC1")])
    finally:
        rclpy.shutdown(context=ctx)
