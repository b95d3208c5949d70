"""hqsmem_ros/ObjectPrompt messages -> pipeline prompts: the checks and conversions the node and
`hqsmem bag --prompt-topic` share. ROS-free: any object with the message's fields will do (rclpy
messages in the node, rosbags messages offline)."""
from __future__ import annotations

import math
from typing import Any, Collection, Optional, Sequence, Tuple

import numpy as np

from ..core.pipeline import PromptError
from . import image_codec
from .image_codec import ImageDecodeError

MAX_ID = 65535  # ids are pixel values of a mono16 label image


def problem_without_frame(prompts: Sequence[Any], used_ids: Collection[int],
                          live_ids: Collection[int]) -> Optional[str]:
    """What is wrong with a request's prompts before any frame is seen (ids, duplicates, reused
    ids, box shape, mask encoding, an empty prompt), or None."""
    seen = set()
    for k, p in enumerate(prompts):
        oid = int(p.id)
        if oid > MAX_ID:
            return f"prompt {k}: id {oid} is above {MAX_ID} (ids are mono16 pixel values)"
        if oid:
            if oid in seen:
                return f"prompt {k}: id {oid} appears twice in one request"
            seen.add(oid)
            if oid in used_ids and oid not in live_ids:
                return (f"prompt {k}: id {oid} was used before by another object and ids are "
                        "never reused; send id 0 to get a fresh one")
        has_mask = p.mask.width > 0 and p.mask.height > 0
        if p.has_box:
            x0, y0, x1, y1 = (float(v) for v in (p.x_min, p.y_min, p.x_max, p.y_max))
            if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
                return f"prompt {k}: box ({x0}, {y0}, {x1}, {y1}) is not finite"
            if x1 <= x0 or y1 <= y0:
                return (f"prompt {k}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty "
                        "(need x_max > x_min, y_max > y_min)")
        if has_mask and p.mask.encoding not in image_codec.MASK_ENCODINGS:
            return (f"prompt {k}: mask encoding {p.mask.encoding!r} is not one of "
                    f"{', '.join(image_codec.MASK_ENCODINGS)}")
        if has_mask and p.mask.encoding in ("mono16", "16UC1") and oid == 0:
            return f"prompt {k}: a mono16 label mask needs the prompt's id (pixels == id)"
        if not p.has_box and not has_mask and not len(p.positive_points):
            return f"prompt {k}: has neither a box (has_box=false), a mask nor a positive point"
    return None


def prompt_mask(msg: Any, oid: int, shape: Tuple[int, int], where: str) -> np.ndarray:
    """An ObjectPrompt's mask image -> bool HxW mask of object `oid` (mono8: nonzero pixels,
    mono16: pixels equal to the id). Every problem is a PromptError starting with `where`."""
    h, w = shape
    try:
        raw = image_codec.mask_from_msg(msg)
    except ImageDecodeError as exc:
        raise PromptError(f"{where}: mask: {exc}") from exc
    if raw.shape != (h, w):
        raise PromptError(f"{where}: mask is {raw.shape[1]}x{raw.shape[0]}, the camera image is {w}x{h}")
    mask = raw == oid if raw.dtype == np.uint16 else raw > 0
    if not mask.any():
        raise PromptError(f"{where}: mask has no pixel of the object")
    return mask


def prompt_box(p: Any, shape: Tuple[int, int], where: str) -> Optional[Tuple[float, float, float, float]]:
    """The prompt's box (has_box), refused when it lies outside the image; None without one."""
    if not p.has_box:
        return None
    h, w = shape
    x0, y0, x1, y1 = (float(v) for v in (p.x_min, p.y_min, p.x_max, p.y_max))
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        raise PromptError(f"{where}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is outside the {w}x{h} image")
    return x0, y0, x1, y1


def click_points(p: Any):
    """An ObjectPrompt's positive/negative points -> [(x, y, 1 | 0)], or None when it has none."""
    pts = ([(float(q.x), float(q.y), 1) for q in p.positive_points]
           + [(float(q.x), float(q.y), 0) for q in p.negative_points])
    return pts or None
