"""What launch/track.launch.py and `hqsmem node --config` do with their arguments (ROS-free).

Kept out of the launch file so it can be tested without `launch`/`launch_ros` (not installable
here) and so both entry points read config files the same way.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from hqsmem_ros.core.config import (ConfigError, PipelineConfig, is_ros_param_file, read_yaml_mapping,
                                    ros_parameter_sections)

EXPECTED_FORMATS = ("a ROS 2 parameter file (`/**:` or `<node>:` then `ros__parameters:`, like "
                    "config/track.yaml) or a plain mapping of pipeline keys (the `hqsmem --config` "
                    "format, e.g. `tau_verify: 0.8`)")

# Launch arguments, their defaults and what they set. An empty default keeps the config file's
# value. Node parameters are set by the argument of the same name.
LAUNCH_ARGUMENTS: Dict[str, Tuple[str, str]] = {
    "image_topic": ("image", "camera image topic (sensor_msgs/Image); a topic ending in /compressed "
                             "subscribes sensor_msgs/CompressedImage"),
    "config": ("", "parameter file (config/track.yaml format) or plain pipeline YAML (hqsmem --config "
                   "format); empty: the installed config/track.yaml"),
    "namespace": ("", "namespace of the node and its topics"),
    "device": ("", "override pipeline.device: cpu, cuda, cuda:N (empty: from config)"),
    "use_sim_time": ("false", "use /clock (bag replay with --clock)"),
    "initial_mask": ("", "label PNG (pixel = object id) that seeds the objects on the first frame"),
    "prompts_file": ("", "YAML prompts file (docs/prompts.md): objects to start at given stamps"),
    "qos_reliability": ("", "image subscription reliability: best_effort (live) or reliable (bag "
                            "replays); empty: from config"),
    "qos_depth": ("", "image subscription history depth (1..100); empty: from config"),
    "frame_queue_size": ("", "frames kept waiting while one is processed (1: newest only; e.g. 1000 "
                             "to process every frame of a replay); empty: from config"),
    "depth_topic": ("", "aligned depth image (16UC1 mm or 32FC1 m, registered to the colour image); "
                        "non-empty turns on 3D outputs (use_depth)"),
    "depth_camera_info_topic": ("", "camera_info of the depth image; empty: camera_info next to "
                                    "depth_topic"),
    "lifecycle": ("false", "run as a lifecycle node (hqsmem_node --lifecycle): configure loads the "
                           "models, activate subscribes and publishes"),
    "autostart": ("true", "with lifecycle:=true, configure and activate at start"),
    "dds_profile": ("shipped", "Fast DDS XML profile for large raw images between processes: 'shipped' "
                               "(the installed config/fastdds.xml), a file, or empty for Fast DDS's "
                               "defaults; the camera driver's process needs it too"),
}

NODE_PARAMETER_ARGUMENTS = ("initial_mask", "prompts_file", "qos_reliability", "qos_depth", "frame_queue_size")
_INT_ARGUMENTS = ("qos_depth", "frame_queue_size")
LIFECYCLE_FLAG = "--lifecycle"


class LaunchArgumentError(ValueError):
    """A launch argument or config file that cannot be used; the message says which and why."""


def is_true(text: str) -> bool:
    v = str(text).strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off", ""):
        return False
    raise LaunchArgumentError(f"expected true or false, got {text!r}")


def ros_params_file(path: str, tmp_dir: Optional[str] = None) -> str:
    """A ROS 2 parameter file for the config file `path`: `path` itself if it is one, else a new
    temporary file that puts a plain pipeline mapping under `/**: ros__parameters: pipeline:`.

    Raises LaunchArgumentError naming the file and the expected formats otherwise.
    """
    try:
        data = read_yaml_mapping(path, expected=EXPECTED_FORMATS)
    except ConfigError as exc:
        raise LaunchArgumentError(str(exc)) from exc
    if is_ros_param_file(data):
        sections = {keys[0] for keys, _ in ros_parameter_sections(data)}
        bad = [k for k in data if str(k) not in sections]
        if bad:
            raise LaunchArgumentError(
                f"config file {path} mixes ROS parameters with plain keys ({', '.join(map(str, bad))} "
                f"at the top level); expected {EXPECTED_FORMATS}")
        return str(path)
    body = data["pipeline"] if set(data) == {"pipeline"} and isinstance(data["pipeline"], dict) else data
    try:
        PipelineConfig.from_dict(body)
    except (ConfigError, TypeError) as exc:
        raise LaunchArgumentError(f"config file {path} is neither format: as a plain pipeline mapping: {exc}; "
                                  f"expected {EXPECTED_FORMATS}") from exc
    fd, tmp = tempfile.mkstemp(prefix="hqsmem_params_", suffix=".yaml", dir=tmp_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump({"/**": {"ros__parameters": {"pipeline": body}}}, f, sort_keys=False)
    return tmp


def depth_camera_info_topic(depth_topic: str) -> str:
    """camera_info beside a depth image topic: /cam/aligned_depth_to_color/image_raw ->
    /cam/aligned_depth_to_color/camera_info (the image_transport convention)."""
    head, _, _ = depth_topic.rstrip("/").rpartition("/")
    return f"{head}/camera_info" if head else "camera_info"


def dds_environment(profile: str, shipped: Optional[str], environ=None) -> Dict[str, str]:
    """The node process's extra environment for the dds_profile launch argument ('shipped',
    a file, or empty = Fast DDS's defaults); a profile already set in `environ` wins."""
    from hqsmem_ros.ros import dds_transport as dds  # ROS-free: environment names only

    environ = os.environ if environ is None else environ
    profile = profile.strip()
    if profile == "shipped":
        profile = shipped or ""
        if not profile:
            return {}  # not installed beside the launch file: the node looks for it itself
    if not profile:
        return {dds.OPT_OUT_ENV: "1"}  # the node must not apply the shipped one either
    if environ.get(dds.PROFILE_ENV) or environ.get(dds.LEGACY_PROFILE_ENV):
        return {}
    if not Path(profile).is_file():
        raise LaunchArgumentError(f"dds_profile file not found: {profile}")
    env = {dds.PROFILE_ENV: profile}
    if environ.get("ROS_DISTRO", "") in dds.FAST_DDS_2_DISTROS:
        env[dds.LEGACY_PROFILE_ENV] = profile
    return env


def node_setup(args: Dict[str, str], default_config: str, tmp_dir: Optional[str] = None,
               shipped_dds_profile: Optional[str] = None) -> Dict[str, Any]:
    """The node's parameter files, parameter overrides, remappings and mode from launch arguments.

    `args` maps argument names (LAUNCH_ARGUMENTS) to their string values; missing ones take
    their defaults. Returns {"parameters": [params file, overrides], "remappings": [...],
    "lifecycle": bool, "autostart": bool, "arguments": [...], "env": {...}}.
    """
    unknown = sorted(set(args) - set(LAUNCH_ARGUMENTS))
    if unknown:
        raise LaunchArgumentError(f"unknown launch argument(s): {', '.join(unknown)}")
    a = {name: str(args.get(name, default)) for name, (default, _) in LAUNCH_ARGUMENTS.items()}
    params_file = ros_params_file(a["config"] or default_config, tmp_dir)
    overrides: Dict[str, Any] = {"use_sim_time": is_true(a["use_sim_time"])}
    if a["device"]:
        overrides["pipeline.device"] = a["device"]
    for name in NODE_PARAMETER_ARGUMENTS:
        value = a[name].strip()
        if not value:
            continue
        if name in _INT_ARGUMENTS:
            try:
                overrides[name] = int(value)
            except ValueError:
                raise LaunchArgumentError(f"{name} must be an integer, got {value!r}") from None
        else:
            overrides[name] = value
    image_topic = a["image_topic"]
    compressed = image_topic.rstrip("/").endswith("/compressed")
    if compressed:
        overrides["input_type"] = "compressed"
    remappings: List[Tuple[str, str]] = [("image/compressed" if compressed else "image", image_topic)]
    if a["depth_topic"]:
        overrides["use_depth"] = True
        remappings.append(("depth", a["depth_topic"]))
        remappings.append(("depth/camera_info", a["depth_camera_info_topic"] or depth_camera_info_topic(a["depth_topic"])))
    elif a["depth_camera_info_topic"]:
        raise LaunchArgumentError("depth_camera_info_topic is set but depth_topic is empty")
    lifecycle = is_true(a["lifecycle"])
    return {"parameters": [params_file, overrides], "remappings": remappings, "lifecycle": lifecycle,
            "autostart": lifecycle and is_true(a["autostart"]),
            "arguments": [LIFECYCLE_FLAG] if lifecycle else [],
            "env": dds_environment(a["dds_profile"], shipped_dds_profile)}
