"""Model registry: a config's `type` name -> the class that implements it.

Entries are "module:Class" strings so that importing the core never imports torch; a model's
module is imported only when a config asks for it. Every class is built through
`Cls.from_config(params: dict, device: str, precision: str)`, and its parameters are those of
`Cls.Settings` (core/settings.py). The block's own keys (config.BLOCK_KEYS: its `precision`) are
read here, never handed to the model: `precision` is the block's or the pipeline's
(config.model_precision).
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, List

from .config import BLOCK_KEYS, ConfigError, PrecisionError, model_precision

TRACKERS: Dict[str, str] = {
    "flow": "hqsmem_ros.models.flow_tracker:FlowTracker",
    "deaot": "hqsmem_ros.models.deaot:DeAOTTracker",
    "sam2": "hqsmem_ros.models.sam2_tracker:SAM2Tracker",
}
REFINERS: Dict[str, str] = {
    "color": "hqsmem_ros.models.color_refiner:ColorBoxRefiner",
    "watershed": "hqsmem_ros.models.watershed_refiner:WatershedRefiner",
    "sam_hq": "hqsmem_ros.models.sam_hq:SamHQRefiner",
}
FEATURES: Dict[str, str] = {
    "histogram": "hqsmem_ros.models.histogram_features:HistogramFeatures",
    "dino": "hqsmem_ros.models.dino:DinoFeatureExtractor",
}
_KINDS = {"tracker": TRACKERS, "refiner": REFINERS, "features": FEATURES}


def names(kind: str) -> List[str]:
    """The registered model names of a kind (tracker, refiner, features)."""
    return sorted(_KINDS[kind])


def model_class(kind: str, name: Any):
    """The class registered as `name` for this kind (importing its module), or ConfigError."""
    table = _KINDS[kind]
    if not isinstance(name, str) or name not in table:
        raise ConfigError(f"unknown {kind} type {name!r}; available: {', '.join(sorted(table))}")
    module_name, cls_name = table[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{kind} {name!r} needs a package that is not installed ({exc}); "
            "install the project with its 'models' extra: pip install -e .[models]") from exc
    return getattr(module, cls_name)


def settings_class(kind: str, name: Any) -> type:
    """The Settings dataclass of a registered model: what its parameters mean and take."""
    return model_class(kind, name).Settings


def check_block_keys(kind: str, cls, spec: Dict[str, Any]) -> None:
    """A block's own keys that its model cannot take: `precision` on a weight-free model."""
    own = spec.get("precision")
    if own is not None and not cls.takes_precision:
        raise ConfigError(f"{kind}.precision {own!r}: {kind} {spec['type']!r} has no weights and no "
                          "precision; only the neural models' blocks take one")


def build(kind: str, spec: Dict[str, Any], device: str = "auto", precision: str = "fp32"):
    """The model of a config block; `precision` is the pipeline's, which the block's own overrides."""
    params = {k: v for k, v in spec.items() if k != "type" and k not in BLOCK_KEYS}
    name = spec["type"]
    cls = model_class(kind, name)
    check_block_keys(kind, cls, spec)
    own = spec.get("precision")
    try:
        return cls.from_config(params, device=device, precision=model_precision(spec, precision))
    except PrecisionError as exc:  # fp16 on the CPU, bf16 on a GPU without it: name the block's key
        if own is None:
            raise
        raise type(exc)(f"{kind}.precision ({kind} {name!r}): {exc}") from exc
    except TypeError as exc:  # a from_config with its own keyword handling; Settings raise ConfigError
        raise ConfigError(f"{kind} {name!r}: bad parameters {params}: {exc}") from exc
