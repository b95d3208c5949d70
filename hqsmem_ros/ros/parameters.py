"""The node's parameters: what each means, declaring them, and the pipeline config they give.

NODE_PARAMS and PIPELINE_PARAM_DOCS are the one source of the parameter descriptions
(docs/ros.md's table is checked against them by a test).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)

from hqsmem_ros.core.config import ConfigError, PipelineConfig
from hqsmem_ros.core.depth3d import DEPTH_NODE_PARAMS
from hqsmem_ros.core.pipeline import HQSMemPipeline
from hqsmem_ros.io import image_codec
from hqsmem_ros.io.prompt_msgs import MAX_ID
from hqsmem_ros.io.prompts_file import PromptsFileError, load_prompts_file


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

# What each pipeline key means (descriptions of the "pipeline.<key>" parameters).
PIPELINE_PARAM_DOCS: Dict[str, str] = {
    "ablation": "Paper row: full | base | base_sam | base_smem | base_hqtf (the three switches "
                "below override it when set)",
    "refine": "Refiner use: off | always | gated (unset: from ablation)",
    "teacher_forcing": "Feed accepted refined masks back to the tracker (unset: from ablation)",
    "smart_memory": "Use the smart long-term memory (unset: from ablation)",
    "device": "auto | cpu | cuda | cuda:N",
    "precision": "fp32 | fp16 | bf16 (half precision on CUDA only)",
    "memory_capacity": "Smart memory size K (frames)",
    "memory_lambda": "Recency weight of the memory eviction score",
    "tau_memory": "Smart-memory similarity threshold",
    "tau_verify": "Refined-mask acceptance threshold (verification)",
    "memory_interval": "A memory candidate every N processed frames",
    "memory_interval_s": "A memory candidate every S seconds of image stamps (unset: use memory_interval)",
    "sequence_length": "Known sequence length L: candidates every L/30 frames (offline rule; unset: live)",
    "min_refine_area": "Coarse masks smaller than this (pixels) are not refined",
    "process_max_side": "Downscale frames so the longer side is at most this before the models (0: no downscaling)",
}

# Pipeline keys (parameters "pipeline.<key>") that are safe to change between two frames.
RUNTIME_PIPELINE_KEYS = HQSMemPipeline.RUNTIME_KEYS
COMPONENT_KEYS = ("tracker", "refiner", "features")


class NodeParameters:
    """Mixin of HQSMemNode: declares the parameters, builds the PipelineConfig from them and
    checks changes while running (runtime keys are handed to the processing thread)."""

    def _declare_parameters(self) -> None:
        self._declared: List[str] = []
        for name, p in NODE_PARAMS.items():
            desc = ParameterDescriptor(description=p.description, read_only=not p.runtime)
            if p.choices:
                desc.additional_constraints = "one of: " + ", ".join(p.choices)
            if p.int_range:
                desc.integer_range = [IntegerRange(from_value=p.int_range[0], to_value=p.int_range[1], step=1)]
            if p.float_range:
                desc.floating_point_range = [FloatingPointRange(
                    from_value=p.float_range[0], to_value=p.float_range[1], step=0.0)]
            self._declare(name, p.default, desc)
            self._check_node_param(name, self.get_parameter(name).value, startup=True)

        defaults = PipelineConfig()
        overrides = getattr(self, "_parameter_overrides", {}) or {}
        for f in dataclasses.fields(PipelineConfig):
            name = f"pipeline.{f.name}"
            runtime = f.name in RUNTIME_PIPELINE_KEYS
            why = "" if runtime else " (fixed while running: restart the node to change it)"
            if f.name in COMPONENT_KEYS:
                default = getattr(defaults, f.name)
                self._declare(f"{name}.type", default["type"], ParameterDescriptor(
                    description=f"Registered {f.name} model name{why}", read_only=True))
                # The component's own constructor parameters: whatever the parameter file gives.
                for key in sorted(k for k in overrides if k.startswith(f"{name}.") and k != f"{name}.type"):
                    self._declare(key, overrides[key].value, ParameterDescriptor(
                        description=f"{f.name} model parameter{why}", read_only=True, dynamic_typing=True))
                for key, value in default.items():  # defaults of the default component
                    if key != "type" and not self.has_parameter(f"{name}.{key}"):
                        self._declare(f"{name}.{key}", value, ParameterDescriptor(
                            description=f"{f.name} model parameter{why}", read_only=True, dynamic_typing=True))
                continue
            value = getattr(defaults, f.name)
            meaning = PIPELINE_PARAM_DOCS.get(f.name, f"Pipeline setting '{f.name}' (hqsmem_ros/core/config.py)")
            desc = ParameterDescriptor(description=meaning + why, read_only=not runtime)
            if value is None:
                desc.dynamic_typing = True  # optional: unset = the ablation preset / off
            self._declare(name, value, desc)

    def _check_random_weights(self, cfg: PipelineConfig) -> List[str]:
        """Untrained models publish plausible-looking garbage: refuse them unless asked for."""
        parts = [f"pipeline.{key} ({getattr(cfg, key).get('type')})" for key in COMPONENT_KEYS
                 if getattr(cfg, key).get("random_weights") is True]
        if parts and not self.get_parameter("allow_random_weights").value:
            raise ConfigError(
                f"{', '.join(parts)}: random_weights is true, so the node would publish masks from "
                "untrained models. Give the models' checkpoints, or set the node parameter "
                "allow_random_weights:=true to run anyway (speed benchmarks only)")
        return parts

    def _declare(self, name: str, default: Any, desc: ParameterDescriptor) -> None:
        self._declared.append(name)
        try:
            self.declare_parameter(name, default, desc)
        except Exception as exc:  # wrong type in the parameter file, e.g. 1 for a float
            raise ConfigError(f"parameter {name!r}: {exc}") from exc

    @staticmethod
    def _plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "array":
            return [NodeParameters._plain(v) for v in value]
        return value

    def _pipeline_dict(self, changes: Dict[str, Any] = None) -> Dict[str, Any]:
        params = {name: self._plain(self.get_parameter(name).value) for name in self._declared}
        params.update(changes or {})
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(PipelineConfig):
            if f.name in COMPONENT_KEYS:
                prefix = f"pipeline.{f.name}."
                out[f.name] = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
                continue
            value = params.get(f"pipeline.{f.name}")
            if value == "" and f.name in ("refine", "memory_interval_s", "sequence_length",
                                          "teacher_forcing", "smart_memory", "process_max_side"):
                value = None
            if isinstance(value, int) and not isinstance(value, bool) and isinstance(
                    getattr(PipelineConfig(), f.name), float):
                value = float(value)  # "tau_verify: 1" in YAML is an integer
            out[f.name] = value
        return out

    def _pipeline_config_from_parameters(self) -> PipelineConfig:
        try:
            return PipelineConfig.from_dict(self._pipeline_dict())
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"invalid pipeline parameters: {exc}") from exc

    def _depth_params(self):
        """DepthParams from the depth parameters (DepthError, a ValueError, for bad values)."""
        from hqsmem_ros.core.depth3d import params_from_node
        return params_from_node({name: self.get_parameter(name).value for name in DEPTH_NODE_PARAMS})

    def _check_node_param(self, name: str, value: Any, startup: bool = False) -> Optional[str]:
        p = NODE_PARAMS[name]
        reason = None
        if p.choices and value not in p.choices:
            reason = f"{name} must be one of {', '.join(p.choices)}, got {value!r}"
        if name == "initial_mask" and value and not Path(value).is_file():
            reason = f"initial_mask: file not found: {value}"
        if reason and startup:
            raise ConfigError(reason)
        return reason

    def _on_set_parameters(self, params) -> SetParametersResult:
        changes: Dict[str, Any] = {}
        for p in params:
            if p.name in NODE_PARAMS:
                reason = self._check_node_param(p.name, p.value)
                if reason:
                    return self._refuse_parameter(reason)
            elif p.name.startswith("pipeline."):
                key = p.name.split(".")[1]
                if key not in RUNTIME_PIPELINE_KEYS:
                    return self._refuse_parameter(
                        f"{p.name} cannot change while the node runs (models and memory are built "
                        "from it at start); restart the node with the new value")
                changes[p.name] = self._plain(p.value)
        if changes:
            try:
                new_cfg = PipelineConfig.from_dict(self._pipeline_dict(changes))
            except (ConfigError, TypeError) as exc:
                return self._refuse_parameter(f"invalid value: {exc}")
            with self._cond:
                self._pending_config = new_cfg
        return SetParametersResult(successful=True)

    def _refuse_parameter(self, reason: str) -> SetParametersResult:
        self._note_error(f"parameter change refused: {reason}")
        return SetParametersResult(successful=False, reason=reason)

    def _apply_config(self, cfg: PipelineConfig) -> None:
        """Between two frames: thresholds and switches the pipeline reads on every frame."""
        try:
            self.pipeline.update_config(cfg)
        except ConfigError as exc:  # validated in the parameter callback; kept as a safety net
            self._note_error(f"parameter change not applied: {exc}")
            return
        self.config = cfg
        self.get_logger().info("pipeline parameters updated")

    # ---------------------------------------------------------------- initial mask
    def _load_initial_mask(self, path: str) -> Optional[np.ndarray]:
        if not path:
            return None
        from PIL import Image as PILImage
        try:
            with PILImage.open(path) as im:
                if im.mode not in ("P", "L", "I;16", "I;16B", "I;16L", "I"):
                    raise ConfigError(f"initial_mask {path}: a label PNG must be single-channel or "
                                      f"palette (pixel = object id), got mode {im.mode}")
                labels = np.array(im)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"initial_mask {path}: cannot read it as an image: {exc}") from exc
        if labels.max() > MAX_ID or labels.min() < 0:
            raise ConfigError(f"initial_mask {path}: ids must be in 0..{MAX_ID}")
        if not labels.any():
            raise ConfigError(f"initial_mask {path}: no object (every pixel is 0)")
        return labels.astype(np.uint16)

    def _load_prompts_file(self, path: str):
        if not path:
            return None
        try:
            return load_prompts_file(path)
        except PromptsFileError as exc:
            raise ConfigError(f"prompts_file: {exc}") from exc

