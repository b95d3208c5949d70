"""The three pluggable parts of HQ-SMem. A new model is one file implementing one of these.

Conventions shared by all parts:
- images are HxWx3 uint8 **RGB** numpy arrays;
- masks are HxW bool arrays at the image's size;
- boxes are float arrays [x0, y0, x1, y1] in pixels, x1/y1 exclusive;
- object ids are positive ints (0 is background in label images).
"""
from __future__ import annotations

import dataclasses

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .settings import parse_settings

Masks = Dict[int, np.ndarray]


class _Buildable:
    """Every part is built by the registry from a config entry through from_config.

    Its settings are the dataclass `Settings` (fields made with core/settings.py's setting():
    default, meaning, allowed values), the one owner of what each parameter means: the config
    entry is validated against it (parse_settings), the node declares its parameters from it and
    docs/ros.md's tables are generated from it.
    """

    kind: ClassVar[str] = "part"  # tracker | refiner | features: how config keys and messages name it
    name: str = "part"
    Settings: ClassVar[type]
    # Whether from_config honours `precision` (the neural parts); a block `precision` on a part
    # that does not is refused by the registry.
    takes_precision: ClassVar[bool] = False

    @classmethod
    def parse_settings(cls, params: Optional[Dict[str, Any]]):
        """The typed Settings for a config entry's parameters (its `type` removed), or ConfigError
        naming the model, the key, the value and what is allowed (unknown keys: the known ones)."""
        return parse_settings(cls.Settings, params, f"{cls.kind} {cls.name!r}")

    def apply_settings(self, params: Optional[Dict[str, Any]]):
        """parse_settings, then each setting as an attribute of the same name (a weight-free
        part's constructor then only adjusts the few it derives). Returns the Settings."""
        settings = self.parse_settings(params)
        for f in dataclasses.fields(settings):
            setattr(self, f.name, getattr(settings, f.name))
        return settings

    @classmethod
    def from_config(cls, params: Dict[str, Any], device: str = "auto", precision: str = "fp32"):
        """The part for a config entry's parameters, validated by parse_settings. The default
        suits a weight-free part whose constructor takes the settings as keywords and ignores
        device and precision; a neural part overrides it to load its weights."""
        return cls(**params)


class BaseTracker(_Buildable, ABC):
    """Memory-based VOS tracker: y_t = D(E(x_t); M_t; y_{t-1}^HQ) (paper Eq. 1, 10).

    The pipeline owns the memory *policy* (smart memory or the tracker's own fixed-gap rule) and
    tells the tracker which frames to write to or drop from its long-term memory.
    """

    kind = "tracker"
    name: str = "base"

    @abstractmethod
    def reset(self) -> None:
        """Forget every object and all memory."""

    @abstractmethod
    def add_objects(self, frame: int, image: np.ndarray, masks: Masks) -> None:
        """Start (or re-prompt) objects on this frame from their masks.

        Called after `track` for the same frame (so existing objects were already tracked on it).
        The pipeline then calls `commit(frame, all masks)` and `store_memory(frame)`, and keeps the
        frame pinned in memory: a prompt frame is never evicted. `store_memory` must therefore
        accept a frame that `add_objects` may already have written (a reference frame).
        """

    @abstractmethod
    def remove_objects(self, ids: Iterable[int]) -> None:
        """Stop tracking these ids; every other object's state is left untouched."""

    @abstractmethod
    def track(self, frame: int, image: np.ndarray) -> Masks:
        """Coarse masks y_t for every tracked object (empty mask = not visible this frame)."""

    @abstractmethod
    def commit(self, frame: int, image: np.ndarray, masks: Masks) -> None:
        """Teacher forcing (Eq. 10): `masks` (refined where accepted) are the prior for t+1 and
        what `store_memory(frame)` writes for this frame."""

    @abstractmethod
    def store_memory(self, frame: int) -> None:
        """Write the committed frame into long-term memory."""

    @abstractmethod
    def drop_memory(self, frame: int) -> None:
        """Remove one frame's entries from long-term memory and free them."""

    @abstractmethod
    def memory_frames(self) -> List[int]:
        """Frame indices held in long-term memory now."""

    def memory_bytes(self) -> int:
        """Bytes held by the long-term memory (0 if the tracker cannot tell)."""
        return 0

    @property
    @abstractmethod
    def object_ids(self) -> List[int]:
        """The ids being tracked now, sorted: added by add_objects, gone after remove_objects or
        reset. The pipeline keeps no list of its own: this is the one record of which objects exist."""

    def set_memory_policy(self, smart_memory: bool, capacity: Optional[int] = None) -> None:
        """Told once by the pipeline: whether smart memory chooses the long-term frames (with at
        most `capacity` of them). A tracker with its own rule to fall back on (SAM2) uses it."""

    max_objects: int = 1_000_000  # identity capacity of the tracker


class Refiner(_Buildable, ABC):
    """Box-prompted mask refiner: image + box -> 3 proposals per object (SAM-HQ's role)."""

    kind = "refiner"
    name: str = "refiner"

    @abstractmethod
    def set_image(self, image: np.ndarray) -> None:
        """Prepare a frame (one image embedding per frame)."""

    @abstractmethod
    def propose(self, boxes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """boxes (N,4) -> (masks (N,3,H,W) bool, scores (N,3) float, higher = more confident)."""

    # The coarse masks as a hint: a refiner that sets accepts_mask_hint takes them as
    # propose(boxes, masks=(N,H,W) bool); the others get the boxes alone.
    accepts_mask_hint: bool = False

    # Click prompts (a user's points on the object / the background). Optional: a refiner that
    # takes them sets accepts_points and implements propose_points.
    accepts_points: bool = False

    def propose_points(self, points: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                       boxes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Per object: points (P,2) x, y and labels (P,) 1 = on the object, 0 = background;
        boxes (N,4), a row of NaN where the object has no box -> like propose()."""
        raise NotImplementedError(f"refiner {self.name!r} does not take point prompts")


class FeatureExtractor(_Buildable, ABC):
    """Appearance features phi(x, m): masked pooling of a per-frame feature map (DINO's role)."""

    kind = "features"
    name: str = "features"

    @abstractmethod
    def set_image(self, image: np.ndarray) -> None:
        """Compute the frame's features once."""

    @abstractmethod
    def embed(self, masks: np.ndarray) -> np.ndarray:
        """masks (M,H,W) bool -> (M,D) float32 unit vectors (all-zero row for an empty mask)."""
