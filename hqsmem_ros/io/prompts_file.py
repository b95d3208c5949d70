"""Prompts files: which objects to start, correct or remove, and when, for offline runs (ROS-free).

`hqsmem bag --prompts FILE` reads one; the node can apply the same file (see `PromptSchedule`).
The format (docs/prompts.md has the user-facing version)::

    version: 1                      # optional
    prompts:                        # start or correct objects
      - id: 1                       # object id, 1..65535 (the pixel value in the masks image)
        frame: 0                    # when: index of the image on the image topic (0 = first) ...
        box: [40, 30, 95, 88]       # x_min, y_min, x_max, y_max in pixels (max exclusive)
        label: car                  # optional text, echoed in TrackedObject.label
      - id: 2
        stamp: 1700000000.25        # ... or the image header stamp in seconds ...
        mask: masks/start.png       # label PNG, path relative to this YAML file
        mask_value: 7               # which pixel value in it is the object (default: the id)
      - id: 3
        stamp: {sec: 1700000003, nanosec: 500000000}   # ... or exact sec/nanosec
        box: [10, 10, 50, 60]
        mask: masks/obj3.png        # box and mask both given: the mask is used
      - id: 4
        frame: 10
        points: [[120, 64]]         # clicks on the object (x, y pixels), with or without a box
        negative_points: [[150, 64]]   # optional clicks on the background
    remove:                         # stop tracking objects (their ids are retired)
      - ids: [1, 2]                 # or `id: 1`
        frame: 300

When: an entry applies to the first processed image at or after it: the first image whose
index on the image topic is >= `frame`, or whose header stamp is >= `stamp`. An image that
cannot be decoded does not consume the entry; it goes to the next good image. Float stamps are
read exactly as written (not rounded through a binary float).

Masks: a palette, grey or 16-bit PNG read as a label image (a black/white PNG reads as id 1). The
object is the pixels equal to `mask_value`, by default the entry's id; when no pixel equals the
id and the image holds a single non-zero value (a binary mask), that value is used. The PNG must
have the camera image's size (checked when the entry is applied).

Every error names the file and the entry (e.g. ``prompts[2] (id 3)``).
"""
from __future__ import annotations

import decimal
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import yaml

from hqsmem_ros.core.pipeline import ObjectPrompt
from hqsmem_ros.io.prompt_msgs import MAX_ID
PROMPT_KEYS = ("id", "frame", "stamp", "box", "mask", "mask_value", "points", "negative_points", "label")
REMOVE_KEYS = ("id", "ids", "frame", "stamp")
TOP_KEYS = ("version", "prompts", "remove")


class PromptsFileError(ValueError):
    """An invalid prompts file or entry; the message names the file and the entry."""


@dataclass
class PromptEntry:
    """One entry of a prompts file: prompts and/or removals due at a frame index or a stamp."""
    source: str  # "FILE: prompts[2] (id 3)", for messages
    frame: Optional[int] = None  # index of the image on the image topic
    stamp_ns: Optional[int] = None  # header stamp, integer nanoseconds
    prompts: List[ObjectPrompt] = field(default_factory=list)
    labels: Dict[int, str] = field(default_factory=dict)
    remove: List[int] = field(default_factory=list)

    def due(self, frame_index: int, stamp_ns: Optional[int]) -> bool:
        if self.frame is not None:
            return frame_index >= self.frame
        return stamp_ns is not None and stamp_ns >= self.stamp_ns

    @property
    def when(self) -> str:
        if self.frame is not None:
            return f"frame {self.frame}"
        return f"stamp {format_stamp(self.stamp_ns)}"


def format_stamp(stamp_ns: int) -> str:
    sec, nsec = divmod(int(stamp_ns), 1_000_000_000)
    return f"{sec}.{nsec:09d}"


class PromptSchedule:
    """The entries of a prompts file, handed out frame by frame.

    Per processed image: ``due = schedule.due(index, stamp_ns)`` (entries in file order), then
    ``schedule.prompts_for(due, (h, w))`` for the pipeline's prompts/removals, and once the frame
    went through ``schedule.mark_applied(due)``. An image that is dropped marks nothing, so its
    entries wait for the next image. `index` counts the images received on the topic (0-based).
    """

    def __init__(self, entries: Sequence[PromptEntry], path: Union[str, Path]):
        self.path = Path(path)
        self.entries = list(entries)
        self._applied = [False] * len(self.entries)

    def due(self, frame_index: int, stamp_ns: Optional[int]) -> List[PromptEntry]:
        return [e for e, done in zip(self.entries, self._applied) if not done and e.due(frame_index, stamp_ns)]

    def mark_applied(self, entries: Sequence[PromptEntry]) -> None:
        ids = {id(e) for e in entries}
        for k, e in enumerate(self.entries):
            if id(e) in ids:
                self._applied[k] = True

    def pending(self) -> List[PromptEntry]:
        """Entries never applied (e.g. after the last image)."""
        return [e for e, done in zip(self.entries, self._applied) if not done]

    def prompts_for(self, entries: Sequence[PromptEntry], shape: Tuple[int, int]
                    ) -> Tuple[List[ObjectPrompt], List[int], Dict[int, str]]:
        """(prompts, removals, labels) of entries due on one frame of size `shape` (h, w).

        Checks what needs the frame (mask size, box inside the image) and that no object is
        prompted twice or both prompted and removed on one frame; errors name the entries.
        """
        h, w = shape
        prompts: List[ObjectPrompt] = []
        remove: List[int] = []
        labels: Dict[int, str] = {}
        owner: Dict[int, str] = {}
        for e in entries:
            for p in e.prompts:
                if p.mask is not None and p.mask.shape != (h, w):
                    raise PromptsFileError(
                        f"{e.source}: mask is {p.mask.shape[1]}x{p.mask.shape[0]} but the image at "
                        f"{e.when} is {w}x{h}")
                if p.mask is None and p.box is not None:
                    x0, y0, x1, y1 = p.box
                    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
                        raise PromptsFileError(
                            f"{e.source}: box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] is outside the {w}x{h} image")
                if p.id in owner:
                    raise PromptsFileError(
                        f"{e.source} and {owner[p.id]} both concern object {p.id} on the same image "
                        f"({e.when}); give them different frames/stamps")
                for x, y, _ in (p.points if p.mask is None and p.points else ()):
                    if not (0 <= x < w and 0 <= y < h):
                        raise PromptsFileError(f"{e.source}: point [{x:g}, {y:g}] is outside the {w}x{h} image")
                owner[p.id] = e.source
                prompts.append(p)
            labels.update(e.labels)
            for oid in e.remove:
                if oid in owner:
                    raise PromptsFileError(
                        f"{e.source} and {owner[oid]} both concern object {oid} on the same image "
                        f"({e.when}); give them different frames/stamps")
                owner[oid] = e.source
                remove.append(oid)
        return prompts, remove, labels


# ---------------------------------------------------------------------------------------------
# Loading


class _ExactLoader(yaml.SafeLoader):
    """YAML floats as Decimal, so `stamp: 1700000000.123456789` keeps its nanoseconds."""


def _construct_decimal(loader: yaml.SafeLoader, node: yaml.Node):
    text = str(loader.construct_scalar(node)).replace("_", "").strip()
    try:
        value = decimal.Decimal(text)
    except decimal.InvalidOperation:  # .inf, .nan and friends
        return yaml.SafeLoader.construct_yaml_float(loader, node)
    return value if value.is_finite() else float(value)


_ExactLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)

_Number = (int, float, decimal.Decimal)


def _is_number(v: Any) -> bool:
    return isinstance(v, _Number) and not isinstance(v, bool)


def load_prompts_file(path: Union[str, Path]) -> PromptSchedule:
    """Read and check a prompts file (format in this module's docstring and docs/prompts.md).

    Mask files are read here; checks that need the image (mask size, box inside the image) run
    when an entry is applied (`PromptSchedule.prompts_for`). Raises PromptsFileError.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptsFileError(f"prompts file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_ExactLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PromptsFileError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise PromptsFileError(f"{path}: expected a mapping with 'prompts' and/or 'remove' lists, "
                               f"got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in TOP_KEYS)
    if unknown:
        raise PromptsFileError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(TOP_KEYS)}")
    if data.get("version", 1) != 1:
        raise PromptsFileError(f"{path}: version {data['version']!r} is not supported (only 1)")
    entries: List[PromptEntry] = []
    mask_cache: Dict[Path, np.ndarray] = {}
    for section, parse in (("prompts", _parse_prompt), ("remove", _parse_remove)):
        items = data.get(section) or []
        if not isinstance(items, list):
            raise PromptsFileError(f"{path}: '{section}' must be a list of entries, got {type(items).__name__}")
        for k, item in enumerate(items):
            entries.append(parse(path, f"{section}[{k}]", item, mask_cache))
    if not entries:
        raise PromptsFileError(f"{path}: no entries (give a 'prompts' and/or 'remove' list)")
    _check_order(entries)
    return PromptSchedule(entries, path)


def _object_id(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        raise PromptsFileError(f"{where}: id must be an integer in 1..{MAX_ID}, got {value!r}")
    return int(value)


def _when(where: str, item: Dict[str, Any]) -> Tuple[Optional[int], Optional[int]]:
    has_frame, has_stamp = "frame" in item, "stamp" in item
    if has_frame == has_stamp:
        raise PromptsFileError(f"{where}: give exactly one of 'frame' (image index) or 'stamp' (seconds)")
    if has_frame:
        frame = item["frame"]
        if isinstance(frame, bool) or not isinstance(frame, int) or frame < 0:
            raise PromptsFileError(f"{where}: frame must be an integer >= 0, got {frame!r}")
        return int(frame), None
    return None, _stamp_ns(where, item["stamp"])


def _stamp_ns(where: str, stamp: Any) -> int:
    if isinstance(stamp, dict):
        extra = sorted(set(stamp) - {"sec", "nanosec"})
        sec, nsec = stamp.get("sec"), stamp.get("nanosec", 0)
        if extra or isinstance(sec, bool) or not isinstance(sec, int) or isinstance(nsec, bool) \
                or not isinstance(nsec, int) or not 0 <= nsec < 1_000_000_000 or sec < 0:
            raise PromptsFileError(f"{where}: stamp must be {{sec: int >= 0, nanosec: 0..999999999}}, got {stamp!r}")
        return sec * 1_000_000_000 + nsec
    if not _is_number(stamp) or (isinstance(stamp, float) and not math.isfinite(stamp)) or stamp < 0:
        raise PromptsFileError(f"{where}: stamp must be seconds >= 0 (e.g. 1700000000.25) or "
                               f"{{sec, nanosec}}, got {stamp!r}")
    ns = decimal.Decimal(str(stamp)) * 1_000_000_000
    if ns != ns.to_integral_value():
        raise PromptsFileError(f"{where}: stamp {stamp} has more than 9 decimals (nanoseconds)")
    return int(ns)


def _check_keys(where: str, item: Any, known: Sequence[str]) -> None:
    if not isinstance(item, dict):
        raise PromptsFileError(f"{where}: expected a mapping, got {item!r}")
    unknown = sorted(str(k) for k in item if k not in known)
    if unknown:
        raise PromptsFileError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")


def _parse_prompt(path: Path, name: str, item: Any, mask_cache: Dict[Path, np.ndarray]) -> PromptEntry:
    _check_keys(f"{path}: {name}", item, PROMPT_KEYS)
    if "id" not in item:
        raise PromptsFileError(f"{path}: {name}: missing 'id'")
    oid = _object_id(f"{path}: {name}", item["id"])
    where = f"{path}: {name} (id {oid})"
    frame, stamp_ns = _when(where, item)
    box = None
    if item.get("box") is not None:
        box = item["box"]
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box) \
                or not all(math.isfinite(float(v)) for v in box):
            raise PromptsFileError(f"{where}: box must be [x_min, y_min, x_max, y_max] (4 numbers), got {box!r}")
        box = tuple(float(v) for v in box)
        if box[2] <= box[0] or box[3] <= box[1]:
            raise PromptsFileError(f"{where}: box {list(box)} is empty (need x_max > x_min and y_max > y_min)")
    mask = None
    if item.get("mask") is not None:
        mask = _read_mask(path, where, item["mask"], item.get("mask_value"), oid, mask_cache)
    elif "mask_value" in item:
        raise PromptsFileError(f"{where}: mask_value given without a mask file")
    clicks = _clicks(where, item.get("points"), "points", 1) + _clicks(where, item.get("negative_points"),
                                                                     "negative_points", 0)
    if box is None and mask is None and not any(c[2] == 1 for c in clicks):
        raise PromptsFileError(f"{where}: give a 'box', a 'mask' file and/or 'points' on the object")
    label = item.get("label")
    if label is not None and not isinstance(label, str):
        raise PromptsFileError(f"{where}: label must be text, got {label!r}")
    entry = PromptEntry(where, frame, stamp_ns,
                        prompts=[ObjectPrompt(id=oid, mask=mask, box=box, points=clicks or None)])
    if label:
        entry.labels[oid] = label
    return entry


def _clicks(where: str, value: Any, key: str, label: int) -> List[Tuple[float, float, int]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(_is_number(v) and math.isfinite(float(v)) for v in p)
            for p in value):
        raise PromptsFileError(f"{where}: {key} must be a list of [x, y] pixel pairs, got {value!r}")
    return [(float(x), float(y), label) for x, y in value]


def _read_mask(path: Path, where: str, rel: Any, value: Any, oid: int,
               cache: Dict[Path, np.ndarray]) -> np.ndarray:
    from hqsmem_ros.eval.davis_io import DataError, read_label

    if not isinstance(rel, str) or not rel:
        raise PromptsFileError(f"{where}: mask must be a file path, got {rel!r}")
    mask_path = (path.parent / rel).resolve() if not Path(rel).is_absolute() else Path(rel)
    if mask_path not in cache:
        if not mask_path.is_file():
            raise PromptsFileError(f"{where}: mask file not found: {mask_path}")
        try:
            cache[mask_path] = read_label(mask_path)
        except DataError as exc:
            raise PromptsFileError(f"{where}: {exc}") from exc
    labels = cache[mask_path]
    present = [int(v) for v in np.unique(labels) if v]
    if value is None:
        value = oid
        if oid not in present and len(present) == 1:
            value = present[0]  # a binary mask: its one non-zero value is the object
    elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PromptsFileError(f"{where}: mask_value must be an integer > 0, got {value!r}")
    if value not in present:
        raise PromptsFileError(
            f"{where}: mask file {mask_path} has no pixel equal to {value} (values present: "
            f"{present[:20] or 'none, the image is empty'}); set mask_value")
    return labels == value


def _parse_remove(path: Path, name: str, item: Any, mask_cache) -> PromptEntry:
    _check_keys(f"{path}: {name}", item, REMOVE_KEYS)
    if ("id" in item) == ("ids" in item):
        raise PromptsFileError(f"{path}: {name}: give exactly one of 'id' or 'ids'")
    raw = [item["id"]] if "id" in item else item["ids"]
    if not isinstance(raw, list) or not raw:
        raise PromptsFileError(f"{path}: {name}: ids must be a non-empty list, got {raw!r}")
    ids = [_object_id(f"{path}: {name}", v) for v in raw]
    if len(set(ids)) != len(ids):
        raise PromptsFileError(f"{path}: {name}: an id appears twice in {ids}")
    where = f"{path}: {name} (id{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))})"
    frame, stamp_ns = _when(where, item)
    return PromptEntry(where, frame, stamp_ns, remove=ids)


def _check_order(entries: Sequence[PromptEntry]) -> None:
    """Entries that can be judged without the bag: an object prompted twice at the same time."""
    seen: Dict[Tuple[str, int, int], str] = {}
    for e in entries:
        key_time = ("frame", e.frame) if e.frame is not None else ("stamp", e.stamp_ns)
        for oid in [p.id for p in e.prompts] + e.remove:
            key = (key_time[0], key_time[1], oid)
            if key in seen:
                raise PromptsFileError(f"{e.source} and {seen[key].split(': ', 1)[-1]} both concern "
                                       f"object {oid} at {e.when}")
            seen[key] = e.source
