"""The node's own parameters (not the pipeline's): name -> default, meaning, whether it may
change while running, and its allowed values. ROS-free, so that the docs generator
(tools/param_docs.py) reads the same table the node declares (ros/parameters.py)."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

from hqsmem_ros.core.depth3d import DEPTH_NODE_PARAMS
from hqsmem_ros.io import image_codec


@dataclasses.dataclass
class _NodeParam:
    default: Any
    description: str
    runtime: bool  # may change while running
    choices: Tuple[str, ...] = ()
    int_range: Optional[Tuple[int, int]] = None
    float_range: Optional[Tuple[float, float]] = None


NODE_PARAMS: Dict[str, _NodeParam] = {
    "input_type": _NodeParam("raw", "Subscribe to 'image' (raw) or 'image/compressed' (compressed)",
                             False, choices=("raw", "compressed")),
    "qos_reliability": _NodeParam("best_effort", "Reliability of the image subscription "
                                  "(best_effort matches camera drivers' sensor-data QoS)", False,
                                  choices=("best_effort", "reliable")),
    "qos_depth": _NodeParam(5, "History depth of the image subscription", False, int_range=(1, 100)),
    "frame_queue_size": _NodeParam(1, "Frames kept waiting while one is processed: 1 = only the "
                                   "newest (live cameras); more = process every frame in order "
                                   "while the queue has room (bag replays at full rate); a frame "
                                   "pushed out is counted as dropped (replaced)", False,
                                   int_range=(1, 1000)),
    "publish_overlay": _NodeParam(True, "Publish ~/overlay (only computed while someone subscribes)", True),
    "overlay_alpha": _NodeParam(0.5, "Mask opacity in ~/overlay", True, float_range=(0.0, 1.0)),
    "initial_mask": _NodeParam("", "Label PNG (pixel value = object id) that seeds the objects "
                               "on the first frame; empty = start with no objects", False),
    "prompts_file": _NodeParam("", "YAML prompts file (docs/prompts.md), the format of `hqsmem bag "
                               "--prompts`: objects to start, correct or remove at given stamps "
                               "(or indices of the frames this node processes)", False),
    "max_image_pixels": _NodeParam(image_codec.DEFAULT_MAX_PIXELS, "Largest image (width x height) "
                                   "decoded; larger ones (by their size fields or compressed "
                                   "header, checked before decoding) are dropped as bad_image",
                                   False, int_range=(1, 1_000_000_000)),
    "use_camera_info": _NodeParam(False, "Subscribe to camera_info and check its size against the images", False),
    "diagnostics_period": _NodeParam(1.0, "Seconds between /diagnostics messages", False,
                                     float_range=(0.1, 60.0)),
    "reset_on_time_jump": _NodeParam(True, "Reset the tracker when image stamps or the clock go "
                                     "back (a looping bag); otherwise such frames are dropped", True),
    "service_timeout": _NodeParam(5.0, "Seconds ~/add_objects and ~/remove_objects wait for a "
                                  "frame to apply the request to", True, float_range=(0.1, 600.0)),
    "allow_random_weights": _NodeParam(False, "Start even if a model has random_weights: true "
                                       "(untrained weights: masks are meaningless; speed benchmarks only)",
                                       False),
}

# The depth/3D parameters: names, defaults and meanings from core/depth3d.py (their one owner);
# only the ranges and which may change while running are the node's.
_DEPTH_RANGES = {"depth_tolerance": (0.0, 10.0), "depth_stale_after": (0.0, 3600.0), "depth_wait": (0.0, 5.0),
                 "depth_mad_k": (0.0, 1000.0), "depth_min_m": (0.0, 1000.0), "depth_max_m": (0.0, 1000.0),
                 "depth_buffer_size": (1, 1000), "depth_min_points": (1, 1_000_000), "points_decimation": (1, 10_000)}
for _name, (_field, _default, _doc) in DEPTH_NODE_PARAMS.items():
    _r = _DEPTH_RANGES.get(_name)
    NODE_PARAMS[_name] = _NodeParam(_default, _doc, _name == "publish_points",
                                    int_range=_r if isinstance(_default, int) and not isinstance(_default, bool) else None,
                                    float_range=_r if isinstance(_default, float) else None)
