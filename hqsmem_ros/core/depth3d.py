"""Objects in 3D from an aligned depth image: pairing by stamp, robust centres, extents, points.

ROS-free (numpy only): the node and `hqsmem bag` feed it message fields and the pipeline's
`FrameResult`, and publish what it returns.

- `DepthPairer`: colour frames meet the depth frame nearest in stamp within a tolerance, from a
  small buffer of recent depth frames; a colour frame without one is counted with its reason
  (`no_depth_yet`, `outside_tolerance`, `depth_stale`). message_filters'
  ApproximateTimeSynchronizer is not on PyPI and cannot serve `hqsmem bag` (no ROS there), so
  this one class replaces it everywhere.
- `measure_objects`: per object, the valid depth under its mask (16UC1 millimetres or 32FC1
  metres; 0, NaN and values outside [min_depth_m, max_depth_m] are invalid), outliers rejected
  with the median absolute deviation (|z - median| > mad_k * 1.4826 * MAD, MAD floored at
  `mad_floor_m`), the inliers back-projected with the pinhole intrinsics (pixel centres at
  integer coordinates, as in camera_info's K); centre = per-axis median of the inlier points,
  extent = their axis-aligned box in the camera optical frame (x right, y down, z forward).
- `pack_points`: the objects' inlier points as a PointCloud2 layout (fields x, y, z float32 and
  id uint16, 16-byte points, little-endian), returned as field tuples and bytes.
- `Depth3D`: the above behind the calls a node or a bag session makes per message.

Written here rather than taken from a library: yolo_ros' detect_3d_node does the same median/MAD
filtering but is a ROS node, not an importable function; no PyPI package offers it.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np


class DepthError(ValueError):
    """Bad depth input (encoding, size, camera_info); the message says what and why."""


# Encodings of aligned depth images and their unit in metres.
DEPTH_ENCODINGS: Dict[str, Tuple[np.dtype, float]] = {
    "16UC1": (np.dtype(np.uint16), 0.001),  # millimetres (RealSense, Azure Kinect, OAK)
    "mono16": (np.dtype(np.uint16), 0.001),  # some drivers label millimetre depth like this
    "32FC1": (np.dtype(np.float32), 1.0),  # metres (ZED, Gazebo, depth_image_proc)
}

# Reasons a colour frame gets no 3D output (counted per reason).
NO_DEPTH_YET = "no_depth_yet"
OUTSIDE_TOLERANCE = "outside_tolerance"
DEPTH_STALE = "depth_stale"
NO_CAMERA_INFO = "no_camera_info"
SIZE_MISMATCH = "size_mismatch"
NO_VALID_DEPTH = "no_valid_depth"
FRAME_REASONS = (NO_DEPTH_YET, OUTSIDE_TOLERANCE, DEPTH_STALE, NO_CAMERA_INFO, SIZE_MISMATCH, NO_VALID_DEPTH)

# PointField datatypes (sensor_msgs/PointField constants).
POINTFIELD_UINT16 = 4
POINTFIELD_FLOAT32 = 7
POINT_DTYPE = np.dtype({"names": ["x", "y", "z", "id"], "formats": ["<f4", "<f4", "<f4", "<u2"],
                        "offsets": [0, 4, 8, 12], "itemsize": 16})
POINT_FIELDS: Tuple[Tuple[str, int, int, int], ...] = (
    ("x", 0, POINTFIELD_FLOAT32, 1), ("y", 4, POINTFIELD_FLOAT32, 1),
    ("z", 8, POINTFIELD_FLOAT32, 1), ("id", 12, POINTFIELD_UINT16, 1))


# ---------------------------------------------------------------------------------------------
# Parameters (the node declares these through ros/parameters.py; one owner: this table)


@dataclass
class DepthParams:
    tolerance_s: float = 0.02
    stale_after_s: float = 1.0
    buffer_size: int = 10
    min_points: int = 20
    mad_k: float = 3.0
    mad_floor_m: float = 0.005
    min_depth_m: float = 0.1
    max_depth_m: float = 20.0
    points_decimation: int = 1
    # Live streams: how long a colour frame's 3D step waits for its depth frame (0: use what has
    # arrived; bag sessions feed in stamp order and never wait).
    wait_s: float = 0.0
    # Medians from at most this many evenly strided points per object (counts, extents and the
    # point cloud use all): a median of 8192 samples is within ~1 % of a sigma of the full one.
    stats_max_points: int = 8192

    def validate(self) -> None:
        for name, lo in (("tolerance_s", 0.0), ("stale_after_s", 0.0), ("mad_k", 0.0), ("mad_floor_m", 0.0),
                         ("min_depth_m", 0.0), ("wait_s", 0.0)):
            v = getattr(self, name)
            finite = math.isfinite(v) if isinstance(v, (int, float)) else False
            if name == "mad_k" and v == math.inf:
                finite = True  # no outlier rejection
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not finite or v < lo:
                raise DepthError(f"{name} must be a number >= {lo}, got {v!r}")
        if not self.max_depth_m > self.min_depth_m:
            raise DepthError(f"max_depth_m ({self.max_depth_m}) must exceed min_depth_m ({self.min_depth_m})")
        for name in ("buffer_size", "min_points", "points_decimation", "stats_max_points"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DepthError(f"{name} must be an integer >= 1, got {v!r}")


# Node parameter name -> (DepthParams field or None, default, description). `use_depth` and
# `publish_points` are the node's own switches; the others' defaults are DepthParams'.
_DEPTH_NODE_DOCS: Tuple[Tuple[str, Optional[str], Any, str], ...] = (
    ("use_depth", None, False, "Subscribe to 'depth' (sensor_msgs/Image 16UC1 millimetres or 32FC1 metres, "
                               "registered to the colour image) and 'depth/camera_info'; adds 3D position, "
                               "extent and valid point count to ~/objects"),
    ("depth_tolerance", "tolerance_s", None, "Largest stamp difference (s) between a colour frame and the "
                                             "depth frame paired with it"),
    ("depth_stale_after", "stale_after_s", None, "A colour frame this many seconds newer than the newest "
                                                 "depth frame counts as depth_stale"),
    ("depth_buffer_size", "buffer_size", None, "Recent depth frames kept for pairing"),
    ("depth_wait", "wait_s", None, "Seconds a colour frame's 3D step waits for a depth frame still on its way "
                                   "(only while the depth stream is live; 0: use what has arrived)"),
    ("depth_min_points", "min_points", None, "Fewest valid depth points (after outlier rejection) for an "
                                             "object's 3D position"),
    ("depth_mad_k", "mad_k", None, "Outlier rejection: drop depths further than k * 1.4826 * MAD from the median"),
    ("depth_min_m", "min_depth_m", None, "Depths below this (m) are invalid"),
    ("depth_max_m", "max_depth_m", None, "Depths above this (m) are invalid"),
    ("points_decimation", "points_decimation", None, "~/points keeps every N-th point of each object"),
    ("publish_points", None, True, "Publish ~/points (PointCloud2 of the objects' inlier points; only built "
                                   "while someone subscribes)"),
)
DEPTH_NODE_PARAMS: Dict[str, Tuple[Optional[str], Any, str]] = {
    name: (f, getattr(DepthParams(), f) if f else default, doc) for name, f, default, doc in _DEPTH_NODE_DOCS}


def params_from_node(values: Dict[str, Any]) -> DepthParams:
    """DepthParams from node parameter values (names of DEPTH_NODE_PARAMS); others ignored."""
    kwargs = {f: values[name] for name, (f, _, _) in DEPTH_NODE_PARAMS.items() if f and name in values}
    p = DepthParams(**kwargs)
    p.validate()
    return p


# ---------------------------------------------------------------------------------------------
# Input: depth images and intrinsics


@dataclass(frozen=True)
class Intrinsics:
    fx: float
    fy: float
    cx: float
    cy: float
    width: int = 0  # 0: unknown (not checked)
    height: int = 0


def intrinsics_from_k(k: Optional[Sequence[float]], width: int = 0, height: int = 0) -> Intrinsics:
    """Intrinsics from camera_info's K (3x3 row-major: fx 0 cx / 0 fy cy / 0 0 1)."""
    if k is None:
        raise DepthError("no camera_info received: 3D needs the depth camera's intrinsics (K)")
    k = [float(v) for v in k]
    if len(k) != 9:
        raise DepthError(f"camera_info K must have 9 values, got {len(k)}")
    fx, cx, fy, cy = k[0], k[2], k[4], k[5]
    if not all(math.isfinite(v) for v in (fx, fy, cx, cy)) or fx <= 0 or fy <= 0:
        raise DepthError(f"camera_info has no usable focal length (fx={fx}, fy={fy}): an "
                         "uncalibrated camera; 3D needs K")
    return Intrinsics(fx, fy, cx, cy, int(width), int(height))


@dataclass
class DepthImage:
    """A depth frame as sent (no copy): values times `scale` are metres."""
    values: np.ndarray  # HxW uint16 or float32
    scale: float
    stamp: Optional[float] = None
    frame_id: str = ""

    @property
    def shape(self) -> Tuple[int, int]:
        return self.values.shape[:2]


def decode_depth(encoding: str, height: int, width: int, step: int, is_bigendian: bool, data: Any,
                 stamp: Optional[float] = None, frame_id: str = "") -> DepthImage:
    """sensor_msgs/Image fields of a depth image -> DepthImage (a view of `data` where possible)."""
    if encoding not in DEPTH_ENCODINGS:
        raise DepthError(f"unsupported depth encoding {encoding!r}; expected one of "
                         f"{', '.join(DEPTH_ENCODINGS)} (millimetres as 16UC1, metres as 32FC1)")
    dtype, scale = DEPTH_ENCODINGS[encoding]
    height, width, step = int(height), int(width), int(step)
    if height <= 0 or width <= 0:
        raise DepthError(f"empty depth image: {width}x{height} pixels")
    row_bytes = width * dtype.itemsize
    if step < row_bytes or step % dtype.itemsize:
        raise DepthError(f"depth step {step} does not fit width {width} x {dtype.itemsize} bytes ({encoding})")
    buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).ravel()
    if buf.size != step * height:
        raise DepthError(f"depth image has {buf.size} bytes, step*height = {step * height} expected ({encoding})")
    rows = buf.reshape(height, step)[:, :row_bytes]
    if not rows.flags.c_contiguous:
        rows = np.ascontiguousarray(rows)
    values = rows.view(dtype.newbyteorder(">" if is_bigendian else "<")).reshape(height, width)
    if not values.dtype.isnative:
        values = values.astype(dtype)
    return DepthImage(values, scale, stamp, frame_id)


def depth_from_array(values: np.ndarray, encoding: str, stamp: Optional[float] = None, frame_id: str = "") -> DepthImage:
    """A DepthImage from an HxW array in `encoding` (16UC1/mono16 millimetres, 32FC1 metres)."""
    if encoding not in DEPTH_ENCODINGS:
        raise DepthError(f"unsupported depth encoding {encoding!r}; expected one of {', '.join(DEPTH_ENCODINGS)}")
    dtype, scale = DEPTH_ENCODINGS[encoding]
    values = np.asarray(values)
    if values.ndim != 2 or values.dtype != dtype:
        raise DepthError(f"{encoding} depth must be a 2-D {dtype} array, got {values.dtype} {values.shape}")
    return DepthImage(values, scale, stamp, frame_id)


def check_frame(depth: DepthImage, colour_hw: Tuple[int, int], intr: Optional[Intrinsics]) -> None:
    """Raise DepthError unless the depth frame is registered to the colour frame and K fits it."""
    if tuple(depth.shape) != tuple(colour_hw):
        raise DepthError(f"depth image is {depth.shape[1]}x{depth.shape[0]}, colour image "
                         f"{colour_hw[1]}x{colour_hw[0]}: the depth must be registered (aligned) to the "
                         "colour image")
    if intr is None:
        raise DepthError("no camera_info received: 3D needs the depth camera's intrinsics (K)")
    if intr.width and intr.height and (intr.width, intr.height) != (depth.shape[1], depth.shape[0]):
        raise DepthError(f"camera_info is for {intr.width}x{intr.height} images, the depth image is "
                         f"{depth.shape[1]}x{depth.shape[0]}")


def has_valid_depth(depth: DepthImage, params: DepthParams) -> bool:
    lo, hi = params.min_depth_m / depth.scale, params.max_depth_m / depth.scale
    v = depth.values
    return bool(np.any((v > lo) & (v < hi)))


# ---------------------------------------------------------------------------------------------
# Per-object 3D


@dataclass
class Object3D:
    id: int
    has_position: bool
    position: Tuple[float, float, float]  # metres, camera optical frame; NaN without a position
    size: Tuple[float, float, float]  # extent of the inlier points along x, y, z (m)
    box_min: Tuple[float, float, float]
    box_max: Tuple[float, float, float]
    valid_points: int  # valid depth pixels under the mask
    inlier_points: int  # of those, kept by the MAD test (what position and size come from)
    reason: str = ""  # why there is no position ("" when there is one)


_NAN3 = (math.nan, math.nan, math.nan)


def _no_position(oid: int, valid: int, inliers: int, reason: str) -> Object3D:
    return Object3D(oid, False, _NAN3, _NAN3, _NAN3, _NAN3, valid, inliers, reason)


def _median(a: np.ndarray) -> float:
    """Median of a non-empty 1-D array without NaN (np.partition; np.median's checks cost more)."""
    n = len(a)
    k = n // 2
    part = np.partition(a, [k - 1, k] if n % 2 == 0 else k)
    return float(part[k]) if n % 2 else 0.5 * (float(part[k - 1]) + float(part[k]))


def _raw_bounds(lo: float, hi: float, dtype: np.dtype):
    """[lo, hi] in the image's unit and type (integer images: rounded inwards), for fast compares."""
    if dtype.kind == "u":
        top = np.iinfo(dtype).max
        lo, hi = max(lo, -1.0), min(hi, top + 1.0)  # also no outlier test (mad_k = inf)
        return dtype.type(min(max(math.ceil(lo), 0), top)), dtype.type(min(max(math.floor(hi), 0), top))
    return np.float32(lo), np.float32(hi)


def measure_objects(label: np.ndarray, depth: DepthImage, intr: Intrinsics,
                    objects: Iterable[Tuple[int, Optional[Sequence[int]]]], params: Optional[DepthParams] = None,
                    want_points: bool = False) -> Tuple[List[Object3D], Optional[Tuple[np.ndarray, np.ndarray]]]:
    """3D of each object (id, box x0,y0,x1,y1 exclusive or None = not visible) of a label image.

    Returns the per-object results and, with `want_points`, the inlier points: (N x 3 float32
    xyz, N uint16 ids), each object's points decimated by `params.points_decimation`.
    """
    p = params or DepthParams()
    vals, scale = depth.values, depth.scale
    lo, hi = p.min_depth_m / scale, p.max_depth_m / scale  # compare in the image's own unit
    out: List[Object3D] = []
    pts: List[np.ndarray] = []
    pid: List[np.ndarray] = []
    for oid, box in objects:
        oid = int(oid)
        if box is None or box[2] <= box[0] or box[3] <= box[1]:
            out.append(_no_position(oid, 0, 0, "not visible"))
            continue
        x0, y0, x1, y1 = (int(b) for b in box)
        sub = vals[y0:y1, x0:x1]
        vs, us = np.nonzero(label[y0:y1, x0:x1] == oid)
        raw = sub[vs, us]
        ok = (raw > lo) & (raw < hi)  # NaN compares false: invalid
        n_valid = int(np.count_nonzero(ok))
        if n_valid < p.min_points:
            out.append(_no_position(oid, n_valid, 0, f"too few valid depth points ({n_valid} < {p.min_points})"))
            continue
        z = raw[ok].astype(np.float32)
        if scale != 1.0:
            z *= np.float32(scale)
        step = -(-len(z) // p.stats_max_points)  # ceil: strided sample for the medians
        med = _median(z[::step])
        sigma = max(1.4826 * _median(np.abs(z[::step] - np.float32(med))), p.mad_floor_m)
        # Inliers, tested on the raw values in their own unit (one pass, no chained indexing).
        half = p.mad_k * sigma / scale
        r_lo, r_hi = _raw_bounds(med / scale - half, med / scale + half, raw.dtype)
        keep = ok & (raw >= r_lo) & (raw <= r_hi)
        n_in = int(np.count_nonzero(keep))
        if n_in < p.min_points:
            out.append(_no_position(oid, n_valid, n_in, f"too few depth points after outlier rejection "
                                                        f"({n_in} < {p.min_points})"))
            continue
        z = raw[keep].astype(np.float32)
        if scale != 1.0:
            z *= np.float32(scale)
        u = us[keep].astype(np.float32)
        v = vs[keep].astype(np.float32)
        x = (u + np.float32(x0 - intr.cx)) * z * np.float32(1.0 / intr.fx)
        y = (v + np.float32(y0 - intr.cy)) * z * np.float32(1.0 / intr.fy)
        lo3 = (float(x.min()), float(y.min()), float(z.min()))
        hi3 = (float(x.max()), float(y.max()), float(z.max()))
        step = -(-n_in // p.stats_max_points)
        centre = (_median(x[::step]), _median(y[::step]), _median(z[::step]))
        out.append(Object3D(oid, True, centre, tuple(b - a for a, b in zip(lo3, hi3)), lo3, hi3, n_valid, n_in))
        if want_points:
            k = p.points_decimation
            xyz = np.stack([x[::k], y[::k], z[::k]], axis=1)
            pts.append(xyz)
            pid.append(np.full(len(xyz), oid, np.uint16))
    if not want_points:
        return out, None
    if pts:
        return out, (np.concatenate(pts).astype(np.float32, copy=False), np.concatenate(pid))
    return out, (np.zeros((0, 3), np.float32), np.zeros(0, np.uint16))


def pack_points(xyz: np.ndarray, ids: np.ndarray) -> Dict[str, Any]:
    """PointCloud2 layout of the points: height 1, width N, fields x, y, z (float32) and id
    (uint16) at offsets 0, 4, 8, 12, point_step 16, little-endian, dense (no NaN points).

    The ROS adapter copies these keys into sensor_msgs/PointCloud2 (fields as PointField)."""
    xyz = np.asarray(xyz, np.float32).reshape(-1, 3)
    ids = np.asarray(ids)
    if len(ids) != len(xyz):
        raise ValueError(f"{len(xyz)} points but {len(ids)} ids")
    buf = np.zeros(len(xyz), POINT_DTYPE)
    buf["x"], buf["y"], buf["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    buf["id"] = ids.astype(np.uint16)
    return {"height": 1, "width": len(xyz), "fields": POINT_FIELDS, "is_bigendian": False,
            "point_step": POINT_DTYPE.itemsize, "row_step": POINT_DTYPE.itemsize * len(xyz),
            "data": buf.tobytes(), "is_dense": bool(np.isfinite(xyz).all())}


def unpack_points(data: bytes) -> np.ndarray:
    """The inverse of pack_points' data: a structured array with x, y, z, id."""
    return np.frombuffer(data, POINT_DTYPE)


# ---------------------------------------------------------------------------------------------
# Pairing colour frames with depth frames by stamp


class DepthPairer:
    """Recent depth frames, and the one nearest a colour frame's stamp within `tolerance_s`.

    Stamps are seconds (message stamps). A depth stamp going back (a looping bag) empties the
    buffer. A colour frame gets nothing, with the reason counted, when no depth frame arrived
    yet (since start or the last reset), when the newest depth frame is more than
    `stale_after_s` older than it (the depth stream stopped), or when the nearest one is
    further than `tolerance_s` away. Thread-safe.
    """

    def __init__(self, tolerance_s: float = 0.02, buffer_size: int = 10, stale_after_s: float = 1.0):
        self.tolerance_s, self.stale_after_s = float(tolerance_s), float(stale_after_s)
        self._buf: Deque[Tuple[float, Any]] = deque(maxlen=int(buffer_size))
        self._cond = threading.Condition()
        self.counts: Dict[str, int] = {"paired": 0, NO_DEPTH_YET: 0, OUTSIDE_TOLERANCE: 0, DEPTH_STALE: 0,
                                       "depth_received": 0, "depth_resets": 0}

    def reset(self) -> None:
        with self._cond:
            self._buf.clear()

    def add(self, stamp: float, item: Any) -> None:
        with self._cond:
            self.counts["depth_received"] += 1
            if self._buf and stamp < self._buf[-1][0]:
                self._buf.clear()
                self.counts["depth_resets"] += 1
            self._buf.append((float(stamp), item))
            self._cond.notify_all()

    def _decide(self, stamp: float) -> Tuple[Optional[Any], str, bool]:
        """(item, reason, a later depth frame could still pair) from the buffer as it is."""
        if not self._buf:
            return None, NO_DEPTH_YET, False  # nothing to wait for: the stream has not started
        newest = self._buf[-1][0]
        if stamp - newest > self.stale_after_s:
            return None, DEPTH_STALE, False
        best_stamp, best = min(self._buf, key=lambda e: abs(e[0] - stamp))
        if abs(best_stamp - stamp) <= self.tolerance_s + 1e-9:
            return best, "", False
        return None, OUTSIDE_TOLERANCE, newest < stamp + self.tolerance_s

    def match(self, stamp: float, wait_s: float = 0.0) -> Tuple[Optional[Any], str]:
        """(depth item, "") or (None, reason) for a colour frame stamped `stamp`.

        With `wait_s` > 0, a frame whose depth may still be on its way (the depth stream is live
        and its newest frame is older than this stamp) waits up to that long for it; a stream
        that has not started or is stale is answered at once.
        """
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                item, reason, pending = self._decide(stamp)
                remaining = deadline - time.monotonic()
                if not pending or remaining <= 0:
                    break
                self._cond.wait(remaining)
            self.counts["paired" if not reason else reason] += 1
            return item, reason


# ---------------------------------------------------------------------------------------------
# What a node or bag session calls


@dataclass
class Frame3D:
    stamp: Optional[float]
    objects: List[Object3D]  # one per object of the result (empty when `reason` is set)
    reason: str = ""  # why this frame has no 3D (one of FRAME_REASONS), "" when it has
    error: str = ""  # the readable message behind `reason`
    depth_stamp: Optional[float] = None
    frame_id: str = ""  # the depth image's frame (the optical frame the positions are in)
    points: Optional[Tuple[np.ndarray, np.ndarray]] = None  # (xyz N x 3 float32, ids N uint16)


class Depth3D:
    """Pairs depth frames with the pipeline's results and measures every object in 3D.

    Per message: `add_depth(...)` for each depth image, `set_camera_info(...)` for each
    camera_info, and `process(result, want_points)` for each pipeline result. Bad depth
    messages are refused with a DepthError (counted in `counts['bad_depth']`); a result
    without usable depth gets a Frame3D with the reason, counted in `counts['no_3d.<reason>']`.
    """

    def __init__(self, params: Optional[DepthParams] = None):
        self.params = params or DepthParams()
        self.params.validate()
        self.pairer = DepthPairer(self.params.tolerance_s, self.params.buffer_size, self.params.stale_after_s)
        self.intrinsics: Optional[Intrinsics] = None
        self.camera_info_error = ""
        self.last_error = ""
        self.counts: Dict[str, int] = {"frames_3d": 0, "bad_depth": 0, "bad_camera_info": 0}
        for r in FRAME_REASONS:
            self.counts[f"no_3d.{r}"] = 0

    def add_depth(self, encoding: str, height: int, width: int, step: int, is_bigendian: bool, data: Any,
                  stamp: float, frame_id: str = "") -> DepthImage:
        try:
            depth = decode_depth(encoding, height, width, step, is_bigendian, data, stamp, frame_id)
        except DepthError as exc:
            self.counts["bad_depth"] += 1
            self.last_error = f"depth image refused: {exc}"
            raise
        self.pairer.add(stamp, depth)
        return depth

    def add_depth_image(self, depth: DepthImage) -> None:
        self.pairer.add(depth.stamp, depth)

    def set_camera_info(self, k: Optional[Sequence[float]], width: int = 0, height: int = 0) -> Intrinsics:
        try:
            self.intrinsics = intrinsics_from_k(k, width, height)
            self.camera_info_error = ""
        except DepthError as exc:
            self.intrinsics = None
            self.counts["bad_camera_info"] += 1
            self.camera_info_error = self.last_error = f"camera_info refused: {exc}"
            raise
        return self.intrinsics

    def reset(self) -> None:
        """Forget buffered depth frames (the stream jumped back in time)."""
        self.pairer.reset()

    def _fail(self, stamp, reason: str, error: str, depth: Optional[DepthImage] = None) -> Frame3D:
        self.counts[f"no_3d.{reason}"] += 1
        self.last_error = error
        return Frame3D(stamp, [], reason, error, depth.stamp if depth is not None else None,
                       depth.frame_id if depth is not None else "")

    def process(self, result: Any, want_points: bool = False) -> Frame3D:
        """3D for a pipeline FrameResult (its `stamp`, `shape`, `label` and `objects`)."""
        stamp = result.stamp
        depth, reason = self.pairer.match(stamp if stamp is not None else math.nan, self.params.wait_s)
        if depth is None:
            msg = {NO_DEPTH_YET: "no depth frame received yet",
                   DEPTH_STALE: f"depth stream stale: newest depth frame more than "
                                f"{self.params.stale_after_s} s older than the colour frame",
                   OUTSIDE_TOLERANCE: f"no depth frame within {self.params.tolerance_s} s of the colour frame"}[reason]
            return self._fail(stamp, reason, msg)
        if self.intrinsics is None:
            return self._fail(stamp, NO_CAMERA_INFO, self.camera_info_error or
                              "no camera_info received: 3D needs the depth camera's intrinsics (K)", depth)
        try:
            check_frame(depth, tuple(result.shape), self.intrinsics)
        except DepthError as exc:
            return self._fail(stamp, SIZE_MISMATCH, str(exc), depth)
        boxes = [(o.id, o.box if o.visible else None) for o in result.objects]
        objects, points = measure_objects(result.label, depth, self.intrinsics, boxes, self.params, want_points)
        if objects and not any(o.has_position for o in objects) and any(o.valid_points == 0 for o in objects):
            if not has_valid_depth(depth, self.params):
                return self._fail(stamp, NO_VALID_DEPTH, "depth image has no valid values (all zero, NaN or "
                                                         "out of range)", depth)
        self.counts["frames_3d"] += 1
        return Frame3D(stamp, objects, "", "", depth.stamp, depth.frame_id, points)
