"""Safe checkpoint loading, device and precision handling shared by the neural models.

Loading never executes pickled code:
- ``*.safetensors`` files are read with the ``safetensors`` package (no pickle at all);
- every other file goes through ``torch.load(weights_only=True, map_location="cpu")``, whose
  restricted unpickler refuses any object other than tensors and plain containers. A file that
  would run code on load is refused with a `CheckpointError`, and nothing in it is executed.

An optional sha256 (from the config) is checked on the raw bytes *before* the file is parsed.

Official checkpoints are often wrapped: training scripts save ``{"model": state_dict, ...}``,
``{"state_dict": ...}`` or ``{"model_state": ...}`` (possibly nested). `load_state_dict`
unwraps these keys (in that order of preference, up to three levels), and strips a ``module.``
prefix carried by every key (weights saved from a DistributedDataParallel wrapper). What is
left must map parameter names to tensors; anything else is refused with the offending keys.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence

import torch

from ..core.config import PRECISIONS, ConfigError, PrecisionError
from ..core.settings import setting

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("model", "state_dict", "model_state")
_MAX_LISTED = 5


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used; the message names the file and the model."""


class DeviceError(ConfigError):
    """A device or precision that this machine cannot provide."""


class PrecisionUnavailable(DeviceError, PrecisionError):
    """A precision this device cannot run (the registry names the block key it came from)."""


@dataclass
class WeightSettings:
    """The settings every neural model has (its Settings dataclass extends this one)."""
    checkpoint: Optional[str] = setting(None, "Path of the official weights file (nothing is downloaded; "
                                        "the error names where to get it)")
    sha256: Optional[str] = setting(None, "Expected SHA-256 of the checkpoint file, checked before it is "
                                    "read (unset: not checked)")
    random_weights: bool = setting(False, "Run untrained random weights instead of a checkpoint (speed "
                                   "benchmarks only: masks are meaningless; the node refuses them "
                                   "unless allow_random_weights)")
    seed: int = setting(0, "Seed of the random weights")


def sha256_of_file(path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def _describe(path: Path, expected_model: str) -> str:
    return f"checkpoint {str(path)!r} (for model {expected_model})"


def load_state_dict(path, expected_model: str, sha256: Optional[str] = None,
                    where: str = "") -> Dict[str, torch.Tensor]:
    """Read a state_dict from `path` without running pickled code; see the module docstring.
    `where` (which file the model needs and where users get it) is added to the errors for a
    missing path or file."""
    get = f"; {where}" if where else ""
    if path is None or str(path) == "":
        raise CheckpointError(f"no checkpoint path given for model {expected_model}{get}")
    path = Path(path).expanduser()
    what = _describe(path, expected_model)
    if not path.exists():
        raise CheckpointError(f"{what}: file not found{get}")
    if not path.is_file():
        raise CheckpointError(f"{what}: not a regular file")

    if sha256 is not None and str(sha256).strip() != "":
        expected = str(sha256).strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise CheckpointError(f"{what}: sha256 must be 64 hexadecimal digits, got {sha256!r}")
        actual = sha256_of_file(path)
        if actual != expected:
            raise CheckpointError(
                f"{what}: sha256 mismatch, refused before reading it (expected {expected}, "
                f"file has {actual}); the file is not the one the config names, or it was altered")

    if path.suffix == ".safetensors":
        obj = _load_safetensors(path, what)
    else:
        obj = _load_torch(path, what)
    return _unwrap(obj, what)


def _load_safetensors(path: Path, what: str):
    try:
        from safetensors.torch import load_file
    except ImportError as exc:  # pragma: no cover - safetensors comes with timm
        raise CheckpointError(f"{what}: reading .safetensors needs the 'safetensors' package") from exc
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error type for bad headers/lengths
        raise CheckpointError(f"{what}: cannot read the safetensors file, truncated or corrupt? ({exc})") from exc


def _torch_file_problem(path: Path) -> Optional[str]:
    """Why the file cannot be a torch.save() file (a zip archive since PyTorch 1.6, a pickle
    before), from its first bytes; None when it may be one."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return None
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<!--")):
        kind = "an HTML/XML page (a download that saved a web page instead of the file?)"
    elif not head:
        kind = "an empty file"
    elif head.startswith(b"version https://git-lfs"):
        kind = "a Git LFS pointer (run git lfs pull)"
    else:
        kind = f"unknown data (first bytes {head[:8].hex()})"
    return (f"not a PyTorch checkpoint: torch.save() writes a zip archive (or, before PyTorch 1.6, "
            f"a pickle), and this is {kind}")


def _load_torch(path: Path, what: str):
    try:
        problem = _torch_file_problem(path)
    except OSError as exc:
        raise CheckpointError(f"{what}: cannot read the file ({exc.strerror or exc})") from exc
    if problem:
        raise CheckpointError(f"{what}: {problem}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights_only" in text or "Weights only load failed" in text or "Unsupported global" in text \
                or "Unsupported operand" in text:
            raise CheckpointError(
                f"{what}: refused, the file holds pickled objects other than tensors (loading it "
                "could run code). Only plain state_dicts are accepted: in a trusted environment, "
                "re-save just the weights (torch.save(model.state_dict(), ...)) or convert to "
                f".safetensors. Loader said: {_refusal_reason(text)}") from exc
        raise CheckpointError(f"{what}: cannot unpickle the file, truncated or corrupt? ({text})") from exc
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, IndexError, KeyError) as exc:
        raise CheckpointError(f"{what}: cannot read the file, truncated or corrupt? "
                              f"({type(exc).__name__}: {exc})") from exc


def _refusal_reason(text: str) -> str:
    """The part of torch's weights_only error that names the refused object (not its advice)."""
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation", "Re-running")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(advice)]
    tail = text.split("WeightsUnpickler error:", 1)
    if len(tail) == 2:
        lines = [ln.strip() for ln in tail[1].splitlines()
                 if ln.strip() and not ln.strip().startswith(advice)]
    return " ".join(lines) or "unsupported content in the pickle"


def _unwrap(obj, what: str) -> Dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and not _is_tensor_map(obj):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{what}: expected a state_dict (a mapping of names to tensors), "
                              f"got {type(obj).__name__}")
    if not obj:
        raise CheckpointError(f"{what}: the state_dict is empty")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{what}: {len(bad)} entries are not tensors ({_listed(map(str, bad))}); top-level keys: "
            f"{_listed(map(str, obj.keys()))}. Wrappers understood: {', '.join(WRAPPER_KEYS)}")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _is_tensor_map(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _listed(items: Iterable[str], limit: int = _MAX_LISTED) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def apply_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], file, expected_model: str,
                     optional_missing: Sequence[str] = (), hint: str = "") -> None:
    """Strictly load `sd` into `model`, or raise a `CheckpointError` that lists what does not fit.

    `optional_missing` are regular expressions for model keys that a checkpoint may lack because
    the forward pass never uses them (they keep their initial values). `hint` is appended to the
    error (e.g. which model type the checkpoint looks like).
    """
    own = model.state_dict()
    is_optional = re.compile("|".join(f"(?:{p})" for p in optional_missing)).fullmatch if optional_missing \
        else (lambda _k: None)
    missing = [k for k in own if k not in sd and not is_optional(k)]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_listed(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_listed(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({_listed(mismatched, 3)})")
        msg = (f"{_describe(Path(str(file)), expected_model)} does not fit the model: " + "; ".join(parts)
               + ". Is it a checkpoint for a different model type?")
        if hint:
            msg += " " + hint
        raise CheckpointError(msg)
    lacking = [k for k in own if k not in sd]
    model.load_state_dict(dict(sd), strict=not lacking)


# -- device and precision ---------------------------------------------------------------------


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> the first CUDA device if there is one, else the CPU; 'cpu', 'cuda', 'cuda:N'."""
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not m:
        raise DeviceError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(f"device {device!r} was asked for but no CUDA GPU is usable here "
                          f"(torch {torch.__version__}, {build}); use device 'cpu' or 'auto'")
    index = int(m.group(1)) if m.group(1) is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {device!r} was asked for but only {count} CUDA device(s) exist")
    return torch.device("cuda", index)


# fp16 on the CPU: torch's CPU autocast can run float16, but without hardware float16 arithmetic
# (most CPUs) it is emulated, many times slower than fp32 (docs/benchmarks.md). So it is refused
# unless this switch asks for it, to check on the CPU the fp16 numerics that the GPU profiles use.
CPU_FP16_SWITCH = "HQSMEM_CPU_FP16"


@functools.lru_cache(maxsize=None)
def cpu_autocast_has_float16() -> bool:
    """Whether this torch's CPU autocast computes in float16 (builds without it warn and disable
    autocast, or refuse the dtype): probed with one tiny matmul rather than a version number."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device_type="cpu", dtype=torch.float16):
                out = torch.mm(torch.ones(2, 2), torch.ones(2, 2))
        except (RuntimeError, TypeError, ValueError):
            return False
    return out.dtype == torch.float16


@functools.lru_cache(maxsize=None)
def _warn_cpu_fp16_once() -> None:
    log.warning("precision fp16 on the CPU (%s=1): for checking fp16 numerics only; float16 is emulated "
                "on most CPUs and runs far slower than fp32 or bf16", CPU_FP16_SWITCH)


def _check_cpu_fp16() -> None:
    if os.environ.get(CPU_FP16_SWITCH) != "1":
        raise PrecisionUnavailable("precision 'fp16' needs a CUDA device; on the CPU use 'fp32' or 'bf16' (CPU float16 "
                          "is emulated on most CPUs, many times slower than fp32; set "
                          f"{CPU_FP16_SWITCH}=1 only to check a GPU profile's fp16 numerics on the CPU)")
    if not cpu_autocast_has_float16():
        raise PrecisionUnavailable(f"precision 'fp16' on the CPU ({CPU_FP16_SWITCH}=1): the CPU autocast of torch "
                          f"{torch.__version__} has no float16; use 'fp32' or 'bf16'")
    _warn_cpu_fp16_once()


def check_precision(device: torch.device, precision: str) -> str:
    """Validate a precision for a device at start-up; returns it normalised."""
    p = str(precision).strip().lower()
    if p not in PRECISIONS:
        raise DeviceError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if device.type == "cpu" and p == "fp16":
        _check_cpu_fp16()
    if device.type == "cuda" and p == "bf16" and not torch.cuda.is_bf16_supported():
        raise PrecisionUnavailable(f"precision 'bf16' is not supported by {torch.cuda.get_device_name(device)}; "
                          "use 'fp16' or 'fp32'")
    return p


def autocast_context(device, precision: str):
    """Autocast for fp16/bf16 (fp16 on the CPU only for checking, see above); a no-op for fp32."""
    device = torch.device(device)
    p = check_precision(device, precision)
    if p == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if p == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)
