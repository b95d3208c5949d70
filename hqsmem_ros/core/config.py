"""Pipeline configuration: one dataclass, loaded from YAML or a dict, validated up front.

The same keys are the ROS node's parameters (config/track.yaml) and the CLI's --config file.
"""
from __future__ import annotations

import copy
import difflib
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import yaml


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key."""


# The paper's ablation rows (supp. Table 1) as presets: refine mode, teacher forcing, smart memory.
ABLATIONS: Dict[str, Dict[str, Any]] = {
    "base": {"refine": "off", "teacher_forcing": False, "smart_memory": False},
    "base_sam": {"refine": "always", "teacher_forcing": False, "smart_memory": False},
    "base_smem": {"refine": "off", "teacher_forcing": False, "smart_memory": True},
    "base_hqtf": {"refine": "gated", "teacher_forcing": True, "smart_memory": False},
    "full": {"refine": "gated", "teacher_forcing": True, "smart_memory": True},
}

REFINE_MODES = ("off", "always", "gated")
DEVICES_HELP = "'auto', 'cpu', 'cuda' or 'cuda:N'"


@dataclass
class PipelineConfig:
    # Which paper row to run; individual switches below override the preset when set.
    ablation: str = "full"
    refine: Optional[str] = None  # off | always | gated
    teacher_forcing: Optional[bool] = None
    smart_memory: Optional[bool] = None

    # Components: {"type": registry name, ...constructor params}.
    tracker: Dict[str, Any] = field(default_factory=lambda: {"type": "flow"})
    refiner: Dict[str, Any] = field(default_factory=lambda: {"type": "watershed"})
    features: Dict[str, Any] = field(default_factory=lambda: {"type": "histogram"})
    device: str = "auto"
    precision: str = "fp32"

    # Smart memory (Eq. 3-7) and verification (Eq. 8-9): two distinct thresholds.
    memory_capacity: int = 8
    memory_lambda: float = 1.0
    tau_memory: float = 0.9
    tau_verify: float = 0.9
    # Candidate frames for long-term memory: every `memory_interval` frames, or every
    # `memory_interval_s` seconds of stamps when set (live cameras), or L/30 when
    # `sequence_length` is known (the paper's offline rule).
    memory_interval: int = 5
    memory_interval_s: Optional[float] = None
    sequence_length: Optional[int] = None
    # Objects whose coarse mask is smaller than this (pixels) are not sent to the refiner.
    min_refine_area: int = 16
    # Processing resolution: frames are downscaled so their longer side is at most this many
    # pixels before the models see them; masks are scaled back to the input size. 0 (or None)
    # = input size (neural models do their own resizing).
    process_max_side: Optional[int] = 384

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Optional[Dict[str, Any]]) -> "PipelineConfig":
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            hints = [difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.6) for k in unknown]
            hint = "".join(f"; did you mean {h[0]!r} for {k!r}?" for k, h in zip(unknown, hints) if h)
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}{hint} (known: {', '.join(sorted(known))})")
        cfg = cls(**copy.deepcopy(data))
        cfg.validate()
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return copy.deepcopy(asdict(self))

    def replace(self, **changes) -> "PipelineConfig":
        d = self.to_dict()
        d.update(changes)
        return PipelineConfig.from_dict(d)

    # -- effective switches -----------------------------------------------------------------
    def _preset(self, key: str):
        return ABLATIONS[self.ablation][key]

    @property
    def refine_mode(self) -> str:
        return self.refine if self.refine is not None else self._preset("refine")

    @property
    def use_teacher_forcing(self) -> bool:
        tf = self.teacher_forcing if self.teacher_forcing is not None else self._preset("teacher_forcing")
        return bool(tf) and self.refine_mode != "off"

    @property
    def use_smart_memory(self) -> bool:
        sm = self.smart_memory if self.smart_memory is not None else self._preset("smart_memory")
        return bool(sm)

    def candidate_interval(self) -> int:
        if self.sequence_length:
            return max(1, int(round(self.sequence_length / 30)))
        return self.memory_interval

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        if self.ablation not in ABLATIONS:
            raise ConfigError(f"ablation must be one of {', '.join(ABLATIONS)}, got {self.ablation!r}")
        if self.refine is not None and self.refine not in REFINE_MODES:
            raise ConfigError(f"refine must be one of {', '.join(REFINE_MODES)}, got {self.refine!r}")
        for key in ("teacher_forcing", "smart_memory"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, bool):
                raise ConfigError(f"{key} must be true or false, got {v!r}")
        for key in ("tracker", "refiner", "features"):
            v = getattr(self, key)
            if not isinstance(v, dict) or not isinstance(v.get("type"), str) or not v["type"]:
                raise ConfigError(f"{key} must be a mapping with a 'type' name, got {v!r}")
        dev = self.device
        if not isinstance(dev, str) or not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"device must be {DEVICES_HELP}, got {dev!r}")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"precision must be fp32, fp16 or bf16, got {self.precision!r}")
        _int_at_least("memory_capacity", self.memory_capacity, 1)
        _int_at_least("memory_interval", self.memory_interval, 1)
        _int_at_least("min_refine_area", self.min_refine_area, 0)
        if self.process_max_side:
            _int_at_least("process_max_side", self.process_max_side, 32)
        elif self.process_max_side is not None:
            _int_at_least("process_max_side", self.process_max_side, 0)
        if self.sequence_length is not None:
            _int_at_least("sequence_length", self.sequence_length, 1)
        _number_in("memory_lambda", self.memory_lambda, 0.0, math.inf)
        _number_in("tau_memory", self.tau_memory, -1.0, 1.0)
        _number_in("tau_verify", self.tau_verify, 0.0, 1.0)  # < 0 would accept empty proposals (cos 0)
        if self.memory_interval_s is not None:
            _number_in("memory_interval_s", self.memory_interval_s, 0.0, math.inf)
            if self.memory_interval_s <= 0:
                raise ConfigError(f"memory_interval_s must be > 0, got {self.memory_interval_s!r}")


def _int_at_least(key: str, v: Any, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"{key} must be an integer >= {lo}, got {v!r}")


def _number_in(key: str, v: Any, lo: float, hi: float) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ConfigError(f"{key} must be a number in [{lo}, {hi}], got {v!r}")


def load_config(source: Union[None, str, Path, Dict[str, Any], PipelineConfig] = None) -> PipelineConfig:
    """Defaults, a dict, a PipelineConfig, or a YAML file.

    A YAML file may be a plain mapping of these keys, or a ROS 2 parameter file
    (`<node>: ros__parameters: {pipeline keys...}`), whose pipeline keys are read from the
    `pipeline` sub-mapping if present.
    """
    if source is None:
        return PipelineConfig.from_dict({})
    if isinstance(source, PipelineConfig):
        source.validate()
        return source
    if isinstance(source, dict):
        return PipelineConfig.from_dict(source)
    path = Path(source)
    data = extract_pipeline_section(read_yaml_mapping(path))
    try:
        return PipelineConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def read_yaml_mapping(path: Union[str, Path], who: str = "config file", expected: str = "a mapping") -> Dict[str, Any]:
    """A YAML file holding a mapping (empty: {}), or ConfigError naming the file: missing, not
    UTF-8, not YAML, or not a mapping (`expected` says what it should hold). Every config file
    (--config, parameter files, launch's config) is read here."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{who} not found: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{who} {path} is not UTF-8 text: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{who} {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {who} {path}: {exc.strerror or exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{who} {path} holds a {type(data).__name__}; expected {expected}")
    return data


_MAX_SECTION_DEPTH = 4  # namespaces nested in a parameter file before a node's section


def ros_parameter_sections(data: Mapping[str, Any], _keys: Tuple[str, ...] = ()) -> Iterator[Tuple[Tuple[str, ...], Dict[str, Any]]]:
    """(section keys, parameters) of each `<ns...>: <node>: ros__parameters:` in a ROS 2
    parameter file's mapping (`/**`, `hqsmem_node`, nested namespaces); none for a plain mapping."""
    for key, body in data.items():
        if not isinstance(body, dict):
            continue
        keys = _keys + (str(key),)
        if "ros__parameters" in body:
            yield keys, body["ros__parameters"] or {}
        elif len(keys) < _MAX_SECTION_DEPTH:
            yield from ros_parameter_sections(body, keys)


def is_ros_param_file(data: Mapping[str, Any]) -> bool:
    """Is this mapping a ROS 2 parameter file (rather than a plain mapping of pipeline keys)?"""
    return next(ros_parameter_sections(data), None) is not None


def extract_pipeline_section(data: Dict[str, Any]) -> Dict[str, Any]:
    """Unwrap `{node: {ros__parameters: {pipeline: {...}}}}` or `{pipeline: {...}}` to the pipeline keys."""
    sections = list(ros_parameter_sections(data))
    if len(data) == 1 and len(sections) == 1:  # one node's section and nothing beside it
        data = sections[0][1]
    if "pipeline" in data and isinstance(data["pipeline"], dict):
        data = data["pipeline"]
    return dict(data)
