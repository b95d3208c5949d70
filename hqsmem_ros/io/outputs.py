"""The fields of the node's output messages for one result, shared by the node and `hqsmem bag`
(each builds its own message objects from them: rclpy's or rosbags')."""
from __future__ import annotations

from typing import Any, Dict, List


def tracked_object_fields(result, labels: Dict[int, str]) -> List[Dict[str, Any]]:
    """One hqsmem_ros/TrackedObject's fields per object of a FrameResult, in id order."""
    nan = float("nan")
    out = []
    for o in result.objects:
        cx, cy = (float(o.centroid[0]), float(o.centroid[1])) if o.visible else (nan, nan)
        x0, y0, x1, y1 = (float(v) for v in o.box)
        out.append(dict(id=int(o.id), label=labels.get(o.id, ""), x_min=x0, y_min=y0, x_max=x1, y_max=y1,
                        score=float(o.score), visible=bool(o.visible), refined=bool(o.refined),
                        area=int(o.area), centroid_x=cx, centroid_y=cy))
    return out
