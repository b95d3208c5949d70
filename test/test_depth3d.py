"""3D from aligned depth (hqsmem_ros.core.depth3d) on the synthetic RGB-D scene's exact truth."""
import math

import numpy as np
import pytest

from hqsmem_ros.core.depth3d import (DEPTH_STALE, NO_CAMERA_INFO, NO_DEPTH_YET, NO_VALID_DEPTH, OUTSIDE_TOLERANCE,
                                     POINT_FIELDS, SIZE_MISMATCH, Depth3D, DepthError, DepthPairer, DepthParams,
                                     decode_depth, depth_from_array, intrinsics_from_k, measure_objects, pack_points,
                                     unpack_points)
from hqsmem_ros.core.masks import mask_box
from hqsmem_ros.core.pipeline import FrameResult, TrackedObject
from hqsmem_ros.data.synth_rgbd import intrinsics, iter_rgbd


@pytest.fixture(scope="module")
def frames():
    return list(iter_rgbd(seed=3, size=(320, 240), frames=40, n_objects=3))


def _boxes(label, ids):
    return [(i, mask_box(label == i)) for i in ids]


def _result(label, stamp):
    """A FrameResult as the pipeline builds it, from a label image."""
    objs = []
    for i in sorted(int(v) for v in np.unique(label) if v):
        box = mask_box(label == i)
        objs.append(TrackedObject(i, box, 1.0, True, False, int((label == i).sum()), (0.0, 0.0)))
    return FrameResult(0, stamp, label.shape, objs, {}, [], label.astype(np.uint16))


def _k(intr):
    return [intr.fx, 0, intr.cx, 0, intr.fy, intr.cy, 0, 0, 1]


def test_the_scene_moves_objects_in_depth_between_1_and_4_m(frames):
    dist = {}
    for f in frames:
        for oid, t in f.truth.items():
            dist.setdefault(oid, []).append(t.distance)
            assert 1.0 - 1e-6 <= t.distance <= 4.0 + 1e-6
    assert set(dist) == {1, 2, 3}
    assert all(max(v) - min(v) > 0.3 for v in dist.values())  # each moves in depth
    f = frames[0]
    assert f.depth_mm.dtype == np.uint16 and f.depth_m.dtype == np.float32
    holes = f.depth_mm == 0
    assert 0.01 < holes.mean() < 0.03 and np.isnan(f.depth_m[holes]).all()


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1"])
def test_centre_and_extent_match_the_truth_with_true_masks(frames, encoding):
    intr = intrinsics(320, 240)
    errors, size_err = [], []
    for f in frames:
        depth = depth_from_array(f.depth_mm if encoding == "16UC1" else f.depth_m, encoding)
        objs, _ = measure_objects(f.label, depth, intr, _boxes(f.label, f.truth))
        for o in objs:
            t = f.truth[o.id]
            assert o.has_position and o.reason == ""
            assert o.valid_points <= t.visible_pixels and o.inlier_points >= 0.7 * o.valid_points  # flying pixels on the rim go
            errors.append(np.linalg.norm(np.subtract(o.position, t.centre)))
            size_err.append(np.abs(np.subtract(o.size[:2], np.subtract(t.box_max, t.box_min)[:2])))
    assert np.median(errors) < 0.01  # metres
    assert np.median(size_err) < 0.02  # x/y extent of the visible surface within 2 cm


def test_outliers_under_the_mask_are_rejected(frames):
    """A mask that spills onto the wall behind the object: the median/MAD test keeps the centre."""
    intr = intrinsics(320, 240)
    f = frames[5]
    oid = max(f.truth, key=lambda i: f.truth[i].visible_pixels)
    grown = (f.label == oid)
    import cv2
    grown = cv2.dilate(grown.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    label = np.where(grown & (f.label == 0), oid, f.label).astype(np.uint16)
    depth = depth_from_array(f.depth_mm, "16UC1")
    robust, _ = measure_objects(label, depth, intr, _boxes(label, [oid]))
    naive, _ = measure_objects(label, depth, intr, _boxes(label, [oid]), DepthParams(mad_k=math.inf))
    t = f.truth[oid].centre
    e_robust = np.linalg.norm(np.subtract(robust[0].position, t))
    e_naive = np.linalg.norm(np.subtract(naive[0].position, t))
    assert robust[0].inlier_points < robust[0].valid_points
    assert e_robust < 0.02 < e_naive
    assert naive[0].size[2] > 0.5 > robust[0].size[2]  # the wall's depth is not in the extent


def test_too_few_valid_points_and_invisible_objects_say_so(frames):
    intr = intrinsics(320, 240)
    f = frames[0]
    depth_mm = f.depth_mm.copy()
    depth_mm[f.label == 1] = 0
    objs, pts = measure_objects(f.label, depth_from_array(depth_mm, "16UC1"), intr,
                                _boxes(f.label, [1, 2]) + [(9, None)], want_points=True)
    by = {o.id: o for o in objs}
    assert not by[1].has_position and by[1].valid_points == 0 and "too few valid depth points" in by[1].reason
    assert math.isnan(by[1].position[0])
    assert by[2].has_position
    assert not by[9].has_position and by[9].reason == "not visible"
    assert set(np.unique(pts[1])) == {2}  # only objects with a position contribute points


def test_point_cloud_layout_and_decimation(frames):
    intr = intrinsics(320, 240)
    f = frames[2]
    depth = depth_from_array(f.depth_m, "32FC1")
    objs, (xyz, ids) = measure_objects(f.label, depth, intr, _boxes(f.label, f.truth), want_points=True)
    assert xyz.dtype == np.float32 and ids.dtype == np.uint16 and len(xyz) == len(ids)
    assert len(xyz) == sum(o.inlier_points for o in objs)
    for o in objs:  # the cloud's points are the ones position and size come from
        sel = xyz[ids == o.id]
        np.testing.assert_allclose(np.median(sel, axis=0), o.position, atol=1e-6)
        np.testing.assert_allclose(sel.max(0) - sel.min(0), o.size, atol=1e-6)
    _, (xyz4, ids4) = measure_objects(f.label, depth, intr, _boxes(f.label, f.truth),
                                      DepthParams(points_decimation=4), want_points=True)
    assert len(xyz4) == sum(math.ceil(o.inlier_points / 4) for o in objs)
    cloud = pack_points(xyz4, ids4)
    assert [f[0] for f in cloud["fields"]] == ["x", "y", "z", "id"] and cloud["point_step"] == 16
    assert cloud["width"] == len(xyz4) and cloud["height"] == 1
    assert len(cloud["data"]) == cloud["row_step"] == 16 * len(xyz4)
    back = unpack_points(cloud["data"])
    np.testing.assert_array_equal(back["id"], ids4)
    np.testing.assert_array_equal(np.stack([back["x"], back["y"], back["z"]], 1), xyz4)
    # Read back with the byte offsets the fields declare, as a PointCloud2 reader does.
    raw = np.frombuffer(cloud["data"], np.uint8).reshape(-1, 16)
    for name, offset, datatype, _ in POINT_FIELDS:
        dt = "<f4" if datatype == 7 else "<u2"
        col = raw[:, offset:offset + np.dtype(dt).itemsize].copy().view(dt).ravel()
        np.testing.assert_array_equal(col, back[name])


def test_decode_depth_from_message_fields():
    vals = np.arange(12, dtype=np.uint16).reshape(3, 4) * 100
    padded = np.zeros((3, 5), np.uint16)
    padded[:, :4] = vals
    d = decode_depth("16UC1", 3, 4, 10, False, padded.tobytes())
    np.testing.assert_array_equal(d.values, vals)
    assert d.scale == 0.001
    big = decode_depth("16UC1", 3, 4, 8, True, vals.astype(">u2").tobytes())
    np.testing.assert_array_equal(big.values, vals)
    f = decode_depth("32FC1", 3, 4, 16, False, (vals / 1000).astype(np.float32).tobytes())
    assert f.scale == 1.0 and f.values.dtype == np.float32
    with pytest.raises(DepthError, match="unsupported depth encoding 'rgb8'.*16UC1"):
        decode_depth("rgb8", 3, 4, 12, False, bytes(36))
    with pytest.raises(DepthError, match="step\\*height"):
        decode_depth("16UC1", 3, 4, 8, False, bytes(20))
    with pytest.raises(DepthError, match="step 6"):
        decode_depth("16UC1", 3, 4, 6, False, bytes(18))


def test_camera_info_checks():
    assert intrinsics_from_k([500, 0, 320, 0, 501, 240, 0, 0, 1]).fy == 501
    with pytest.raises(DepthError, match="no camera_info"):
        intrinsics_from_k(None)
    with pytest.raises(DepthError, match="focal length"):
        intrinsics_from_k([0] * 9)
    with pytest.raises(DepthError, match="9 values"):
        intrinsics_from_k([1, 2, 3])


def test_pairing_by_stamp_and_the_reasons_for_no_pair():
    p = DepthPairer(tolerance_s=0.01, buffer_size=3, stale_after_s=0.5)
    assert p.match(1.0) == (None, NO_DEPTH_YET)
    for s in (1.000, 1.033, 1.066):
        p.add(s, f"d{s}")
    assert p.match(1.035) == ("d1.033", "")
    assert p.match(1.05) == (None, OUTSIDE_TOLERANCE)
    p.add(1.100, "d1.1")  # pushes 1.000 out of the 3-frame buffer
    assert p.match(1.001) == (None, OUTSIDE_TOLERANCE)
    assert p.match(1.7) == (None, DEPTH_STALE)
    p.add(0.2, "loop")  # stamps went back: the buffer restarts
    assert p.match(1.1) == (None, DEPTH_STALE) and p.match(0.2) == ("loop", "")
    assert p.counts == {"paired": 2, NO_DEPTH_YET: 1, OUTSIDE_TOLERANCE: 2, DEPTH_STALE: 2,
                        "depth_received": 5, "depth_resets": 1}


def test_depth3d_session_counts_every_frame_and_refuses_bad_input(frames):
    intr = intrinsics(320, 240)
    d3 = Depth3D(DepthParams(tolerance_s=0.005))
    f = frames[1]
    res = _result(f.label, 10.0)
    assert d3.process(res).reason == NO_DEPTH_YET
    d3.add_depth("16UC1", 240, 320, 640, False, f.depth_mm.tobytes(), 10.001, "cam_depth_optical")
    assert d3.process(res).reason == NO_CAMERA_INFO
    with pytest.raises(DepthError):
        d3.set_camera_info([0] * 9, 320, 240)
    assert d3.process(res).reason == NO_CAMERA_INFO and "focal length" in d3.last_error
    d3.set_camera_info(_k(intr), 320, 240)
    out = d3.process(res, want_points=True)
    assert out.reason == "" and out.frame_id == "cam_depth_optical" and out.depth_stamp == 10.001
    assert {o.id for o in out.objects} == set(f.truth) and all(o.has_position for o in out.objects)
    assert len(out.points[0]) == sum(o.inlier_points for o in out.objects)
    assert d3.process(_result(f.label, 10.02)).reason == OUTSIDE_TOLERANCE
    with pytest.raises(DepthError, match="unsupported depth encoding"):
        d3.add_depth("bgr8", 240, 320, 960, False, bytes(240 * 960), 10.03)
    small = np.zeros((120, 160), np.uint16)
    d3.add_depth("16UC1", 120, 160, 320, False, small.tobytes(), 10.04)
    mism = d3.process(_result(f.label, 10.04))
    assert mism.reason == SIZE_MISMATCH and "registered" in mism.error
    d3.add_depth("32FC1", 240, 320, 1280, False, np.full((240, 320), np.nan, np.float32).tobytes(), 10.05)
    nan = d3.process(_result(f.label, 10.05))
    assert nan.reason == NO_VALID_DEPTH and "all zero, NaN" in nan.error
    assert d3.process(_result(f.label, 12.0)).reason == DEPTH_STALE
    c = d3.counts
    assert c["frames_3d"] == 1 and c["bad_depth"] == 1 and c["bad_camera_info"] == 1
    assert (c["no_3d.no_depth_yet"], c["no_3d.no_camera_info"], c["no_3d.outside_tolerance"],
            c["no_3d.size_mismatch"], c["no_3d.no_valid_depth"], c["no_3d.depth_stale"]) == (1, 2, 1, 1, 1, 1)


def test_depth_params_are_validated():
    with pytest.raises(DepthError, match="buffer_size"):
        Depth3D(DepthParams(buffer_size=0))
    with pytest.raises(DepthError, match="max_depth_m"):
        DepthParams(min_depth_m=5.0, max_depth_m=1.0).validate()


def test_node_parameters_map_onto_depth_params():
    from hqsmem_ros.core.depth3d import DEPTH_NODE_PARAMS, params_from_node
    defaults = {name: default for name, (_, default, _) in DEPTH_NODE_PARAMS.items()}
    assert params_from_node(defaults) == DepthParams()
    p = params_from_node(dict(defaults, depth_tolerance=0.05, points_decimation=3, use_depth=True))
    assert (p.tolerance_s, p.points_decimation) == (0.05, 3)
    with pytest.raises(DepthError, match="points_decimation"):
        params_from_node({"points_decimation": 0})


def test_a_colour_frame_waits_for_its_depth_frame_only_while_it_can_still_come():
    import threading
    import time
    p = DepthPairer(tolerance_s=0.01, buffer_size=5, stale_after_s=1.0)
    start = time.monotonic()
    assert p.match(1.0, wait_s=5.0) == (None, NO_DEPTH_YET)  # no stream yet: no wait
    p.add(1.0, "d1")
    late = threading.Timer(0.05, p.add, args=(1.033, "d2"))
    late.start()
    assert p.match(1.033, wait_s=30.0) == ("d2", "")  # woken by the depth frame's arrival
    late.join()
    assert p.match(2.5, wait_s=30.0) == (None, DEPTH_STALE)  # a stopped stream: no wait
    # The next depth frame (stamp past the tolerance) ends the wait of a frame whose depth was dropped.
    after = threading.Timer(0.05, p.add, args=(1.1, "d4"))
    after.start()
    assert p.match(1.066, wait_s=30.0) == (None, OUTSIDE_TOLERANCE)
    after.join()
    assert time.monotonic() - start < 20
