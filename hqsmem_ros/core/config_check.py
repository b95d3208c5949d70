"""One rule for configuration keys, without ROS: a key nobody knows is an error at start.

Used by `hqsmem node` (its --config file and -p overrides, before ROS starts), by the node
itself (every parameter override it does not declare) and by PipelineConfig (plain pipeline
YAML of `hqsmem track/bag --config`). Messages name the key and where it came from, with a
suggestion for near misses (difflib).
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml

from .config import ConfigError, PipelineConfig, is_ros_param_file, read_yaml_mapping, ros_parameter_sections

# Parameters every rclpy node has or accepts, besides the node's own.
ROS_BUILTIN_PARAMS = ("use_sim_time", "start_type_description_service")
ROS_BUILTIN_PREFIXES = ("qos_overrides.",)
COMPONENT_KEYS = ("tracker", "refiner", "features")  # below them: the model's settings (its Settings checks them)


def did_you_mean(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_key_message(key: str, known: Iterable[str], where: str) -> str:
    known = sorted(set(known))
    return f"{where}: unknown key {key!r}{did_you_mean(key, known)} (known: {', '.join(known)})"


def _flatten(prefix: str, value: Any, out: Dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def _section_applies(section: str, node_name: str) -> bool:
    """Does a parameter file section (`/**`, `hqsmem_node`, `/ns/hqsmem_node`, ...) name this node?"""
    pattern = section if section.startswith("/") else "/" + section
    return pattern in ("/**", "/*") or fnmatch.fnmatchcase("/" + node_name, pattern) or \
        pattern.rsplit("/", 1)[-1] == node_name


def file_parameters(path: str, node_name: str) -> Dict[str, Any]:
    """The flattened parameters (`pipeline.tau_verify`, ...) a file gives this node: a ROS
    parameter file's sections for it, or a plain pipeline mapping as `pipeline.*`."""
    data = read_yaml_mapping(path)
    out: Dict[str, Any] = {}
    if not is_ros_param_file(data):
        _flatten("pipeline", data, out) if data else None
        return out
    for keys, params in ros_parameter_sections(data):
        if _section_applies("/".join(keys), node_name):
            _flatten("", params, out)
    return out


def override_parameters(ros_args: Sequence[str]) -> List[Tuple[str, Any, str]]:
    """(name, value, source) of `-p name:=value` / `--param` and `--params-file FILE` in ROS
    arguments; values are parsed as YAML, as rcl does. Files are returned as ("", path, "file")."""
    out: List[Tuple[str, Any, str]] = []
    args = list(ros_args)
    for k, a in enumerate(args):
        nxt = args[k + 1] if k + 1 < len(args) else None
        if a in ("-p", "--param") and nxt is not None and ":=" in nxt:
            name, text = nxt.split(":=", 1)
            try:
                value = yaml.safe_load(text) if text != "" else ""
            except yaml.YAMLError:
                value = text
            out.append((name, value, f"-p {nxt}"))
        elif a == "--params-file" and nxt is not None:
            out.append(("", nxt, "file"))
    return out


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(type(v), type(v).__name__)


def check_node_parameters(params: Mapping[str, Tuple[Any, str]], node_defaults: Mapping[str, Any]) -> None:
    """params: name -> (value, where it came from). Every name must be a node parameter (of
    the default's type), `pipeline.<key>` of PipelineConfig, or a ROS built-in; the pipeline
    keys together must make a valid PipelineConfig. ConfigError names the key and its source."""
    fields = {f.name for f in dataclasses.fields(PipelineConfig)}
    known = list(node_defaults) + [f"pipeline.{f}" for f in fields] + list(ROS_BUILTIN_PARAMS)
    pipeline: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    for name, (value, where) in params.items():
        if name in ROS_BUILTIN_PARAMS or name.startswith(ROS_BUILTIN_PREFIXES):
            continue
        if name in node_defaults:
            default = node_defaults[name]
            ok = (isinstance(value, bool) == isinstance(default, bool)
                  and (isinstance(value, type(default))
                       or (isinstance(default, float) and isinstance(value, int))))
            if not ok:
                raise ConfigError(f"{where}: parameter {name!r} must be {_type_name(default)}, "
                                  f"got {value!r}")
            continue
        parts = name.split(".")
        if parts[0] == "pipeline" and len(parts) >= 2 and parts[1] in fields:
            key = parts[1]
            if key in COMPONENT_KEYS and len(parts) >= 3:
                pipeline.setdefault(key, {})[".".join(parts[2:])] = value
                sources[key] = sources[".".join(parts[1:])] = where
                continue
            if len(parts) == 2:
                pipeline[key] = value
                sources[key] = where
                continue
        raise ConfigError(unknown_key_message(name, known, where))
    for key in COMPONENT_KEYS:
        if key in pipeline and "type" not in pipeline[key]:
            pipeline[key]["type"] = getattr(PipelineConfig(), key)["type"]
    defaults = PipelineConfig()
    for key, value in list(pipeline.items()):
        if value == "" and getattr(defaults, key) is None:
            pipeline[key] = None  # "" is how a ROS parameter file leaves an optional key unset
        elif isinstance(value, int) and not isinstance(value, bool) and isinstance(getattr(defaults, key), float):
            pipeline[key] = float(value)
    try:
        PipelineConfig.from_dict(pipeline)
    except (ConfigError, TypeError) as exc:
        msg = str(exc)  # '<key> must be ...' or '<block>.<key> must be ...' (a block's own keys)
        culprit = next((k for k in sources if "." in k and msg.startswith(f"{k} ")), None) or \
            next((k for k in pipeline if f"{k} " in msg or f"{k}:" in msg), None)
        where = sources.get(culprit, ", ".join(sorted(set(sources.values()))))
        raise ConfigError(f"{where}: {exc}") from exc


def collect_node_parameters(config_file: Optional[str], ros_args: Sequence[str],
                            node_name: str) -> Dict[str, Tuple[Any, str]]:
    """What a node started as `hqsmem node [--config FILE] --ros-args ...` is given, in order
    (later wins, as in rcl): the --config file, --params-file files, then -p overrides."""
    params: Dict[str, Tuple[Any, str]] = {}
    files = [config_file] if config_file else []
    overrides = override_parameters(ros_args)
    files += [v for n, v, kind in overrides if kind == "file"]
    for path in files:
        for name, value in file_parameters(path, node_name).items():
            params[name] = (value, str(path))
    for name, value, where in overrides:
        if name:
            params[name] = (value, where)
    return params


def source_of(name: str, ros_args: Sequence[str], node_name: str) -> str:
    """Where in ROS arguments (a --params-file, or -p) parameter `name` was given."""
    found = "a parameter override"
    for n, value, kind in override_parameters(ros_args):
        if kind == "file":
            try:
                if name in file_parameters(value, node_name):
                    found = str(value)
            except ConfigError:
                continue
        elif n == name:
            found = kind
    return found


def refuse_unknown_overrides(overrides: Iterable[str], declared: Iterable[str], ros_args: Sequence[str],
                             node_name: str) -> None:
    """The node's check: a parameter override (file, -p, launch) it did not declare is a typo."""
    declared = set(declared)
    for name in sorted(overrides):
        if name in declared or name in ROS_BUILTIN_PARAMS or name.startswith(ROS_BUILTIN_PREFIXES):
            continue
        raise ConfigError(unknown_key_message(name, declared, source_of(name, ros_args, node_name)))
