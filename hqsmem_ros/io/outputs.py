"""The fields of the node's output messages for one result, shared by the node and `hqsmem bag`
(each builds its own message objects from them: rclpy's or rosbags')."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

NAN3 = (float("nan"),) * 3


def object_3d_fields(frame3d, oid: int) -> Dict[str, Any]:
    """TrackedObject's 3D fields of object `oid` from a depth3d.Frame3D (position and size as
    (x, y, z) tuples; the drivers make their Point / Vector3 from them)."""
    if frame3d.reason:  # the whole frame has no 3D: every object says why
        return dict(has_position_3d=False, position=NAN3, size=NAN3, valid_depth_points=0,
                    inlier_depth_points=0, position_3d_status=frame3d.reason)
    o = next((o for o in frame3d.objects if o.id == oid), None)
    if o is None:  # not measured (cannot happen with the pipeline's own result; kept explicit)
        return dict(has_position_3d=False, position=NAN3, size=NAN3, valid_depth_points=0,
                    inlier_depth_points=0, position_3d_status="not measured")
    return dict(has_position_3d=bool(o.has_position), position=tuple(float(v) for v in o.position),
                size=tuple(float(v) for v in o.size), valid_depth_points=int(o.valid_points),
                inlier_depth_points=int(o.inlier_points), position_3d_status=o.reason)


def array_3d_fields(frame3d) -> Dict[str, Any]:
    """TrackedObjectArray's 3D fields: frame_id_3d, depth stamp (seconds or None), status_3d."""
    if frame3d is None:
        return dict(frame_id_3d="", depth_stamp=None, status_3d="")
    return dict(frame_id_3d=frame3d.frame_id if not frame3d.reason else "",
                depth_stamp=frame3d.depth_stamp if not frame3d.reason else None, status_3d=frame3d.reason)


def stamp_parts(seconds: Optional[float]) -> Tuple[int, int]:
    """(sec, nanosec) of a stamp in seconds; (0, 0) for None."""
    if seconds is None:
        return 0, 0
    ns = int(round(seconds * 1e9))
    return ns // 1_000_000_000, ns % 1_000_000_000


def tracked_object_fields(result, labels: Dict[int, str], frame3d=None) -> List[Dict[str, Any]]:
    """One hqsmem_ros/TrackedObject's fields per object of a FrameResult, in id order; with a
    depth3d.Frame3D also the 3D fields (see object_3d_fields), else the message defaults."""
    nan = float("nan")
    out = []
    for o in result.objects:
        cx, cy = (float(o.centroid[0]), float(o.centroid[1])) if o.visible else (nan, nan)
        x0, y0, x1, y1 = (float(v) for v in o.box)
        out.append(dict(id=int(o.id), label=labels.get(o.id, ""), x_min=x0, y_min=y0, x_max=x1, y_max=y1,
                        score=float(o.score), visible=bool(o.visible), refined=bool(o.refined),
                        area=int(o.area), centroid_x=cx, centroid_y=cy))
        if frame3d is not None:
            out[-1].update(object_3d_fields(frame3d, int(o.id)))
    return out
