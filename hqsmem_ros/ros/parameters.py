"""The node's parameters: declaring them, and the pipeline config they give.

What a parameter means and takes has one owner each: the node's own parameters are in
ros/param_table.py (NODE_PARAMS), `pipeline.<key>` in PipelineConfig's fields and
`pipeline.<tracker|refiner|features>.<key>` in the configured model's Settings (core/settings.py),
except the block's own `precision` (core/config.py ModelBlockSettings, declared for neural models).
The descriptors declared here and docs/ros.md's tables (tools/param_docs.py) are made from them.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.parameter import Parameter

from hqsmem_ros.core import registry
from hqsmem_ros.core.config import BLOCK_KEYS, ConfigError, ModelBlockSettings, PipelineConfig
from hqsmem_ros.core.depth3d import DEPTH_NODE_PARAMS
from hqsmem_ros.core.pipeline import HQSMemPipeline
from hqsmem_ros.core.settings import SettingInfo, settings_info
from hqsmem_ros.io.prompt_msgs import MAX_ID
from hqsmem_ros.io.prompts_file import PromptsFileError, load_prompts_file
from hqsmem_ros.ros.param_table import NODE_PARAMS


# Pipeline keys (parameters "pipeline.<key>") that are safe to change between two frames.
RUNTIME_PIPELINE_KEYS = HQSMemPipeline.RUNTIME_KEYS
COMPONENT_KEYS = ("tracker", "refiner", "features")
FIXED_WHY = " (fixed while running: restart the node to change it)"
_INT_MAX = 2 ** 63 - 1


def setting_descriptor(info: SettingInfo, read_only: bool, why: str = "") -> ParameterDescriptor:
    """A setting's descriptor: its description, what it takes (additional_constraints) and, for
    a number with bounds, the range ROS checks. Optional settings are dynamically typed (an unset
    one is NOT_SET; "" in a parameter file also leaves it unset)."""
    desc = ParameterDescriptor(description=info.description + why, read_only=read_only,
                               additional_constraints=info.allowed(), dynamic_typing=info.optional)
    if info.has_range and info.base is int:
        lo = int(info.minimum) if info.minimum is not None else -_INT_MAX
        hi = int(info.maximum) if info.maximum is not None else _INT_MAX
        desc.integer_range = [IntegerRange(from_value=lo, to_value=hi, step=1)]
    elif info.has_range and info.base is float:
        lo = float(info.minimum) if info.minimum is not None else -sys.float_info.max
        hi = float(info.maximum) if info.maximum is not None else sys.float_info.max
        desc.floating_point_range = [FloatingPointRange(from_value=lo, to_value=hi, step=0.0)]
    return desc


def ros_value(info: SettingInfo, value: Any) -> Any:
    """A setting's value as a ROS parameter takes it: tuples as lists, and integers where the
    setting is a number ("tau_verify: 1" in YAML is an integer; a DOUBLE parameter refuses it)."""
    if info.base is tuple and isinstance(value, (list, tuple)):
        return [float(v) if info.item is float and isinstance(v, int) and not isinstance(v, bool) else v
                for v in value]
    if info.base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def from_ros_value(info: SettingInfo, value: Any) -> Any:
    """A parameter's value for the Settings: "" leaves an optional non-string setting unset."""
    if value == "" and info.optional and info.base is not str:
        return None
    return value


class NodeParameters:
    """Mixin of HQSMemNode: declares the parameters, builds the PipelineConfig from them and
    checks changes while running (runtime keys are handed to the processing thread)."""

    def _declare_parameters(self) -> None:
        self._declared: List[str] = []
        self._setting_infos: Dict[str, SettingInfo] = {}  # pipeline parameter -> its setting
        self._given_settings: Dict[str, set] = {}  # component -> the model keys given at start
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

        for info in settings_info(PipelineConfig):
            runtime = info.name in RUNTIME_PIPELINE_KEYS
            if info.name in COMPONENT_KEYS:
                self._declare_component(info)
                continue
            desc = setting_descriptor(info, read_only=not runtime, why="" if runtime else FIXED_WHY)
            self._declare_setting(f"pipeline.{info.name}", info, desc)

    def _declare_component(self, component: SettingInfo) -> None:
        """`pipeline.<kind>.type` and every setting of that model (its Settings: description,
        range, choices). The given ones are checked first, so an unknown key or a bad value
        stops the start with the model's own message, the one `hqsmem track` gives."""
        kind, default_type = component.name, component.default["type"]
        prefix = f"pipeline.{kind}."
        overrides = getattr(self, "_parameter_overrides", {}) or {}
        given = overrides.get(prefix + "type")
        model = given.value if given is not None else default_type
        self._declare(prefix + "type", default_type, ParameterDescriptor(
            description=component.description + FIXED_WHY, read_only=True,
            additional_constraints="one of " + ", ".join(registry.names(kind))))
        cls = registry.model_class(kind, model)
        infos = list(settings_info(cls.Settings))
        by_name = {i.name: i for i in infos}
        params = {k[len(prefix):]: self._plain(p.value) for k, p in overrides.items()
                  if k.startswith(prefix) and k != prefix + "type"}
        # The block's own keys (its precision) are the pipeline's, declared for the neural models.
        block = {k: params.pop(k) for k in BLOCK_KEYS if k in params}
        registry.check_block_keys(kind, cls, dict(block, type=model))
        cls.parse_settings({k: from_ros_value(by_name[k], v) if k in by_name else v for k, v in params.items()})
        # The config holds the keys given, as `hqsmem track` would read them from the same file;
        # the others are declared (described) at their defaults, which the model applies anyway.
        self._given_settings[kind] = set(params) | set(block)
        if cls.takes_precision:
            infos = list(settings_info(ModelBlockSettings)) + infos
        for info in infos:
            self._declare_setting(prefix + info.name, info, setting_descriptor(info, True, FIXED_WHY))

    def _declare_setting(self, name: str, info: SettingInfo, desc: ParameterDescriptor) -> None:
        self._setting_infos[name] = info
        overrides = getattr(self, "_parameter_overrides", None)
        if overrides and name in overrides and float in (info.base, info.item):
            # rclpy refuses an INTEGER override of a DOUBLE parameter: "tau_verify: 1" in YAML
            overrides[name] = Parameter(name, value=ros_value(info, self._plain(overrides[name].value)))
        self._declare(name, ros_value(info, info.default), desc)

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
        out: Dict[str, Any] = {key: {} for key in COMPONENT_KEYS}
        for name, value in params.items():
            parts = name.split(".")
            if parts[0] != "pipeline":
                continue
            info = self._setting_infos.get(name)
            value = from_ros_value(info, value) if info is not None else value
            if parts[1] in COMPONENT_KEYS:
                key = ".".join(parts[2:])
                if key == "type" or key in self._given_settings[parts[1]] or name in (changes or {}):
                    out[parts[1]][key] = value
            else:
                out[parts[1]] = value
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

