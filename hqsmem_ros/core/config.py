"""Pipeline configuration: one dataclass, loaded from YAML or a dict, validated up front.

The same keys are the ROS node's parameters (config/track.yaml) and the CLI's --config file.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import yaml

from .settings import ConfigError, check_value, setting, settings_info  # noqa: F401 (ConfigError: its home for callers)


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
PRECISIONS = ("fp32", "fp16", "bf16")
COMPONENTS = ("tracker", "refiner", "features")


def _device_ok(dev: str) -> bool:
    return dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())


def _component_ok(spec: Dict[str, Any]) -> bool:
    return isinstance(spec.get("type"), str) and bool(spec["type"])


class PrecisionError(ConfigError):
    """A precision this machine cannot run (models/checkpoints.py raises it when a model is
    built); here, without torch, so that the registry can name the block key it came from."""


@dataclass
class ModelBlockSettings:
    """Keys of a model block (`pipeline.<tracker|refiner|features>`) that the pipeline reads, not
    the model: beside `type`, the block's own precision. The model's Settings never see them."""
    precision: Optional[str] = setting(
        None, "This model's own precision, overriding pipeline.precision (unset: the pipeline's), with "
        "the same rules; neural models only", choices=PRECISIONS)


BLOCK_KEYS = tuple(f.name for f in fields(ModelBlockSettings))


def model_precision(block: Mapping[str, Any], pipeline_precision: str) -> str:
    """The precision a model block runs in: its own `precision`, else the pipeline's. The one
    place this rule lives (registry.build applies it to every model it builds)."""
    own = block.get("precision")
    return own if own is not None else pipeline_precision


def _component(kind: str, default: str) -> Any:
    return setting({"type": default}, f"Registered {kind} model name (`type`); the model's own settings "
                   f"are the other keys beside it, `pipeline.{kind}.<key>`",
                   check=_component_ok, rule="a mapping with a 'type' name")


@dataclass
class PipelineConfig:
    """Every field's meaning and allowed values are in its setting() (core/settings.py): the
    node's parameter descriptions and docs/ros.md's table come from them."""
    ablation: str = setting("full", "Paper row (supp. Table 1); the three switches below override it "
                            "when set", choices=tuple(ABLATIONS))
    refine: Optional[str] = setting(None, "Refiner use (unset: from ablation)", choices=REFINE_MODES)
    teacher_forcing: Optional[bool] = setting(None, "Feed accepted refined masks back to the tracker "
                                              "(unset: from ablation)")
    smart_memory: Optional[bool] = setting(None, "Use the smart long-term memory (unset: from ablation)")

    # Components: {"type": registry name, ...the model's settings}.
    tracker: Dict[str, Any] = _component("tracker", "flow")
    refiner: Dict[str, Any] = _component("refiner", "watershed")
    features: Dict[str, Any] = _component("features", "histogram")
    device: str = setting("auto", "Where the models run; a missing device is refused, never replaced "
                          "by the CPU", check=_device_ok, rule=DEVICES_HELP)
    precision: str = setting("fp32", "Model precision: fp16 needs CUDA (on the CPU only with "
                             "HQSMEM_CPU_FP16=1, to check its numerics: emulated, slow); bf16 runs on "
                             "the CPU and on GPUs that have it; a model block's own `precision` "
                             "overrides it for that model", choices=PRECISIONS)

    # Smart memory (Eq. 3-7) and verification (Eq. 8-9): two distinct thresholds.
    memory_capacity: int = setting(8, "Smart memory size K: long-term memory never holds more frames "
                                   "(prompt frames are pinned)", minimum=1)
    memory_lambda: float = setting(1.0, "Recency weight lambda of the memory removal score "
                                   "O = Rel (1 + lambda / (t - j))", minimum=0.0)
    tau_memory: float = setting(0.9, "Smart-memory threshold: a candidate replaces the most redundant "
                                "stored frame if its relevance >= this, else it is appended",
                                minimum=-1.0, maximum=1.0)
    # < 0 would accept empty proposals (cos 0)
    tau_verify: float = setting(0.9, "Verification: a refined proposal is accepted if its feature "
                                "cosine to the coarse mask > this", minimum=0.0, maximum=1.0)
    memory_interval: int = setting(5, "A memory candidate every N processed frames", minimum=1)
    memory_interval_s: Optional[float] = setting(
        None, "A memory candidate every S seconds of image stamps, for live cameras (unset: use "
        "memory_interval)", minimum=0.0, exclusive_minimum=True)
    sequence_length: Optional[int] = setting(
        None, "Known sequence length L: candidates every L/30 frames (the paper's offline rule; "
        "unset: live)", minimum=1)
    min_refine_area: int = setting(16, "Coarse masks smaller than this (pixels) are not refined", minimum=0)
    process_max_side: Optional[int] = setting(
        384, "Downscale frames so the longer side is at most this (pixels) before the models see "
        "them; masks are scaled back to the input size (0 or unset: input size; neural models "
        "resize for themselves)", check=lambda v: v == 0 or v >= 32, rule="0 or an integer >= 32")

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
        """Every field against its setting(): ConfigError '<key> must be <allowed>, got <value>';
        a model block's own keys (ModelBlockSettings) as '<block>.<key> must be ...'. The model's
        settings are its Settings', checked when it is built."""
        for info in settings_info(PipelineConfig):
            setattr(self, info.name, check_value(info, getattr(self, info.name)))
        for kind in COMPONENTS:
            block = getattr(self, kind)
            for info in settings_info(ModelBlockSettings):
                if info.name in block:
                    named = dataclasses.replace(info, name=f"{kind}.{info.name}")
                    block[info.name] = check_value(named, block[info.name])

    def model_precision(self, kind: str) -> str:
        """The precision this config's `kind` model runs in (see model_precision)."""
        return model_precision(getattr(self, kind), self.precision)


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
