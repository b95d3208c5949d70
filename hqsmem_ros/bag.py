"""`hqsmem bag`: run HQ-SMem over a recorded rosbag2 bag, offline, without a ROS install.

  hqsmem bag IN_BAG OUT_BAG --image-topic /camera/image_raw [--prompts FILE | --prompt-topic T]

Reads sqlite3 and mcap bags (a bag directory, or a single .mcap/.db3 file) with the `rosbags`
library, decodes sensor_msgs/Image or CompressedImage with the node's own codec
(hqsmem_ros.io.image_codec), runs HQSMemPipeline frame by frame and writes a new bag with
every input topic plus the node's outputs, stamped like the input image they describe (header
and bag time):

  <ns>/masks    sensor_msgs/Image mono16, pixel = object id (the node's ~/masks)
  <ns>/objects  hqsmem_ros/msg/TrackedObjectArray (the node's ~/objects)
  <ns>/overlay  sensor_msgs/Image rgb8, only with --overlay

<ns> defaults to /hqsmem_node, the node's default name, so tools that read a recording of the
live node read this bag the same way. The messages are those the node publishes for the same
frame and requests; the node's rules are followed: image stamps that go back (a looping bag) or
a change of image size reset the tracker (ids are retired, a warning is printed and the reset
counted); one recorded prompt message is applied per frame, like the node's ~/prompts.

Nothing is lost silently: every image of the topic either has one masks and one objects message
in the output, or is counted as dropped (undecodable, or refused by the pipeline) with its
reason; a dropped image has NO masks/objects message (it stays in the output as an input
topic). The summary always reports frames in = results + dropped. The output bag is written to
a hidden temporary folder beside OUT_BAG and moved in place only when complete.

Same bag, same config -> the same output messages (the pipeline is deterministic and nothing
depends on wall-clock time).

With 4 or more usable cores, reading + decoding and encoding + writing run in two threads
beside the pipeline (the frame order is kept), so bag I/O overlaps the pipeline; with fewer, or
with io_threads=False, everything else runs in one thread and only the image decoding runs one
frame ahead in a worker thread (libjpeg-turbo and OpenCV release the GIL, so it fills the
pipeline's idle moments instead of waiting for them). The summary splits the time per frame into
the pipeline's own time and what offline processing adds, and gives the CPU time that bag I/O
costs (see BagSummary.timing).
"""
from __future__ import annotations

import math
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from hqsmem_ros.core.config import load_config
from hqsmem_ros.core.pipeline import FrameError, HQSMemPipeline, ObjectPrompt, PromptError
from hqsmem_ros.io.prompts_file import (PromptEntry, PromptSchedule, PromptsFileError, format_stamp,
                                     load_prompts_file)
from hqsmem_ros.io import image_codec, prompt_msgs
from hqsmem_ros.io.prompt_msgs import MAX_ID
from hqsmem_ros.io.image_codec import ImageDecodeError

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
OBJECTS_TYPE = "hqsmem_ros/msg/TrackedObjectArray"
PROMPTS_TYPE = "hqsmem_ros/msg/ObjectPromptArray"
STORAGES = ("mcap", "sqlite3")
DEFAULT_NS = "/hqsmem_node"


IO_THREADS_MIN_CORES = 4


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class BagError(ValueError):
    """A bag that cannot be read or written, or a request that does not fit it; names the file."""


# ---------------------------------------------------------------------------------------------
# Message types without a ROS build


def msg_dir_candidates() -> List[Path]:
    """Where hqsmem_ros's .msg files may be, most specific first.

    Source checkout: <repo>/msg beside the package. colcon install: share/hqsmem_ros/msg under
    each AMENT_PREFIX_PATH entry (ament_index_python when importable). pip install:
    <prefix>/share/hqsmem_ros/msg (setup.py data_files).
    """
    here = Path(__file__).resolve().parent
    out = [here.parent / "msg"]
    try:
        from ament_index_python.packages import get_package_share_directory
        out.append(Path(get_package_share_directory("hqsmem_ros")) / "msg")
    except Exception:  # not installed, or the package is not in the ament index
        pass
    for prefix in filter(None, os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep)):
        out.append(Path(prefix) / "share" / "hqsmem_ros" / "msg")
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        out.append(Path(prefix) / "share" / "hqsmem_ros" / "msg")
    return out


def find_msg_dir() -> Path:
    tried = msg_dir_candidates()
    for d in tried:
        if (d / "TrackedObjectArray.msg").is_file():
            return d
    raise BagError("hqsmem_ros's message definitions (TrackedObjectArray.msg, ...) were not found; looked in: "
                   + ", ".join(str(d) for d in tried))


_TYPESTORE = None


def make_typestore():
    """rosbags typestore: ROS 2 (Humble) standard types plus hqsmem_ros/msg/* from the .msg files."""
    global _TYPESTORE
    if _TYPESTORE is None:
        from rosbags.typesys import Stores, get_types_from_msg, get_typestore
        store = get_typestore(Stores.ROS2_HUMBLE)
        types: Dict[str, Any] = {}
        for path in sorted(find_msg_dir().glob("*.msg")):
            types.update(get_types_from_msg(path.read_text(encoding="utf-8"), f"hqsmem_ros/msg/{path.stem}"))
        store.register(types)
        _TYPESTORE = store
    return _TYPESTORE


def stamp_ns_of(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


# ---------------------------------------------------------------------------------------------
# Reading


def open_bag(path: Union[str, Path]):
    """An open rosbags Reader; a missing, truncated or corrupt bag gives a BagError naming it."""
    from rosbags.rosbag2 import Reader

    path = Path(path)
    if not path.exists():
        raise BagError(f"input bag not found: {path}")
    try:
        reader = Reader(path)
        reader.open()
    except Exception as exc:  # ReaderError, FileNotFoundError, sqlite3/mcap/yaml errors
        hint = ""
        text = str(exc)
        if "end magic" in text or "malformed" in text or "not a database" in text:
            hint = (" (the file looks truncated or corrupt, e.g. a recording that was cut off; "
                    "`ros2 bag reindex` or `mcap recover` may repair it)")
        elif "metadata" in text:
            hint = " (a bag folder needs its metadata.yaml; or give the .mcap/.db3 file itself)"
        raise BagError(f"cannot read bag {path}: {text}{hint}") from exc
    return reader


def bag_storage(path: Path) -> str:
    """'mcap' or 'sqlite3' for a bag folder or a single storage file."""
    path = Path(path)
    if path.is_file():
        return "mcap" if path.suffix == ".mcap" else "sqlite3"
    import yaml
    try:
        meta = yaml.safe_load((path / "metadata.yaml").read_text(encoding="utf-8"))
        storage = meta["rosbag2_bagfile_information"]["storage_identifier"]
    except Exception:
        storage = "mcap" if any(path.glob("*.mcap")) else "sqlite3"
    return storage if storage in STORAGES else "sqlite3"


def _topic_table(reader) -> str:
    rows = [f"{c.topic} ({c.msgtype}, {c.msgcount} messages)" for c in reader.connections]
    return "; ".join(rows) if rows else "none (the bag is empty)"


# ---------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A plain-text progress line on stderr: frames, frames/s and ETA.

    On a terminal the line is redrawn in place (about 5 times a second); otherwise (a log file,
    CI) one line is printed every `log_every` seconds.
    """

    def __init__(self, total: int, stream=None, enabled: bool = True, log_every: float = 10.0):
        self.total = max(0, int(total))
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = 0.2 if self.tty else log_every
        self.start = time.perf_counter()
        self.last = -math.inf
        self.width = 0

    def line(self, done: int) -> str:
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            pct = 100.0 * done / self.total
            left = (self.total - done) / rate if rate > 0 else float("nan")
            eta = _hms(left) if math.isfinite(left) else "?"
            return f"hqsmem bag: {done}/{self.total} frames {pct:5.1f}%  {rate:6.1f} frames/s  ETA {eta}"
        return f"hqsmem bag: {done} frames  {rate:6.1f} frames/s"

    def update(self, done: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        text = self.line(done)
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self, done: int) -> None:
        if not self.enabled:
            return
        self.update(done, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# ---------------------------------------------------------------------------------------------
# Summary


TIMED_PARTS = ("read", "decode", "pipeline", "encode", "write")
STALLS = ("wait_input", "wait_output", "finish")


@dataclass
class BagSummary:
    in_bag: str
    out_bag: str
    storage: str
    image_topic: str
    image_type: str
    io_threads: bool = True
    image_decoder: str = ""  # the JPEG/PNG library, for CompressedImage input
    frames_in: int = 0
    results: int = 0
    dropped: Dict[str, int] = field(default_factory=dict)
    dropped_examples: List[str] = field(default_factory=list)  # first few, with stamp and reason
    resets: int = 0
    reset_reasons: List[str] = field(default_factory=list)
    prompts_applied: int = 0  # prompt-file entries or prompt messages applied
    prompts_refused: int = 0  # recorded prompt messages refused (as the node would)
    refused_reasons: List[str] = field(default_factory=list)
    prompts_never_applied: List[str] = field(default_factory=list)
    objects_seen: List[int] = field(default_factory=list)
    topics_written: Dict[str, int] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)  # read/decode/pipeline/encode/write/wall
    stage_ms: Dict[str, float] = field(default_factory=dict)  # pipeline stages, mean per result
    warnings: List[str] = field(default_factory=list)
    bench_pipeline_alone_s: Optional[float] = None  # --bench: the pipeline alone over the same frames

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def timing(self) -> Dict[str, float]:
        """Milliseconds per input frame.

        pipeline: HQSMemPipeline.process; wall: the whole run (opening excluded, closing the bag
        included); overhead = wall - pipeline, what offline processing adds to the pipeline's
        own time; overhead_pct = overhead / pipeline. Reading+decoding and encoding+writing run
        in two threads beside the pipeline: read/decode/encode/write are those threads' busy
        times (overlapped with the pipeline, so not added); wait_input/wait_output/finish are
        the main thread's stalls on them and on closing the bag.
        """
        n = max(1, self.frames_in)
        s = self.seconds
        per = {k: 1000.0 * s.get(k, 0.0) / n for k in TIMED_PARTS + ("wall",) + STALLS}
        overhead = s.get("wall", 0.0) - s.get("pipeline", 0.0)
        per["overhead"] = 1000.0 * overhead / n
        per["other"] = per["overhead"] - sum(per[k] for k in STALLS)
        per["overhead_pct"] = 100.0 * overhead / s["pipeline"] if s.get("pipeline") else float("nan")
        per["frames_per_s"] = self.frames_in / s["wall"] if s.get("wall") else float("nan")
        if s.get("cpu_total"):
            # CPU time (all threads of the process): what bag I/O costs, whether or not it
            # overlaps the pipeline; "cpu_rest" is the pipeline (with its own worker threads).
            cpu_io = s.get("cpu_input", 0.0) + s.get("cpu_output", 0.0)
            per["cpu_io"] = 1000.0 * cpu_io / n
            per["cpu_rest"] = 1000.0 * (s["cpu_total"] - cpu_io) / n
            per["cpu_io_pct"] = 100.0 * cpu_io / max(1e-9, s["cpu_total"] - cpu_io)
        if self.bench_pipeline_alone_s:
            per["pipeline_alone"] = 1000.0 * self.bench_pipeline_alone_s / n
            per["wall_over_alone_pct"] = 100.0 * (s.get("wall", 0.0) / self.bench_pipeline_alone_s - 1.0)
        return per

    def to_dict(self) -> Dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["dropped_total"] = self.dropped_total
        d["timing_ms_per_frame"] = self.timing()
        return d

    def format(self) -> str:
        t = self.timing()
        drop = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items()))
        lines = [
            f"hqsmem bag: {self.in_bag} -> {self.out_bag} ({self.storage})",
            f"  frames in {self.frames_in}, results {self.results}, dropped {self.dropped_total}"
            + (f" ({drop}; dropped frames have no masks/objects message)" if drop else ""),
        ]
        lines += [f"    dropped: {e}" for e in self.dropped_examples]
        if self.resets:
            lines.append(f"  tracker resets {self.resets}: " + "; ".join(self.reset_reasons[:5])
                         + (" ..." if len(self.reset_reasons) > 5 else ""))
        if self.prompts_applied or self.prompts_refused or self.prompts_never_applied:
            lines.append(f"  prompts applied {self.prompts_applied}, refused {self.prompts_refused}, "
                         f"never applied {len(self.prompts_never_applied)}")
            lines += [f"    refused: {r}" for r in self.refused_reasons[:5]]
            lines += [f"    never applied (after the last image): {r}" for r in self.prompts_never_applied[:5]]
        lines.append(f"  objects: {self.objects_seen}")
        lines.append(
            f"  time per frame: pipeline {t['pipeline']:.2f} ms, whole run {t['wall']:.2f} ms "
            f"({t['frames_per_s']:.1f} frames/s); offline overhead {t['overhead']:.2f} ms = "
            f"{t['overhead_pct']:.1f}% of the pipeline (waiting for input {t['wait_input']:.2f}, for output "
            f"{t['wait_output']:.2f}, closing {t['finish']:.2f}, bookkeeping {t['other']:.2f})")
        lines.append(
            ("  I/O threads busy per frame (beside the pipeline): " if self.io_threads else
             "  I/O per frame (no I/O threads; images decoded one frame ahead beside the pipeline): ")
            + f"read {t['read']:.2f} ms, decode {t['decode']:.2f}"
            + (f" (JPEG: {self.image_decoder})" if self.image_decoder else "")
            + f", encode {t['encode']:.2f}, write {t['write']:.2f}")
        if "cpu_io" in t:
            lines.append(f"  CPU per frame: bag I/O (read, decode, encode, write) {t['cpu_io']:.2f} ms = "
                         f"{t['cpu_io_pct']:.1f}% of the rest (the pipeline) {t['cpu_rest']:.2f} ms")
        if "pipeline_alone" in t:
            lines.append(f"  --bench: the pipeline alone over the same frames {t['pipeline_alone']:.2f} ms/frame; "
                         f"this run's whole time per frame is {t['wall_over_alone_pct']:+.1f}% of that")
        lines.append("  written: " + ", ".join(f"{k} {v}" for k, v in self.topics_written.items()))
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Recorded prompt messages, applied as the node applies ~/prompts


class _RecordedPrompts:
    """hqsmem_ros/ObjectPromptArray messages from the bag, each due at its header stamp.

    The node takes one pending request per processed frame; so does this. A message's stamp is
    its header stamp, or its bag time when the header stamp is zero.
    """

    def __init__(self, items: List[Tuple[int, int, Any]]):  # (stamp_ns, order, msg)
        self.waiting = deque(sorted(items, key=lambda x: (x[0], x[1])))

    def take(self, stamp_ns: int) -> Optional[Tuple[int, Any]]:
        if self.waiting and self.waiting[0][0] <= stamp_ns:
            stamp, _, msg = self.waiting.popleft()
            return stamp, msg
        return None

    def put_back(self, item: Tuple[int, Any]) -> None:
        self.waiting.appendleft((item[0], -1, item[1]))


# ---------------------------------------------------------------------------------------------
# The node's per-frame bookkeeping, ROS-free


class _NodeState:
    """Ids, labels, frame counter and resets as HQSMemNode keeps them (hqsmem_ros/ros/node.py)."""

    def __init__(self, pipeline: HQSMemPipeline, summary: BagSummary, log):
        self.pipeline = pipeline
        self.summary = summary
        self.log = log
        self.used_ids: set = set()
        self.labels: Dict[int, str] = {}
        self.frame_index = 0
        self.last_stamp: Optional[float] = None
        self.frame_shape: Optional[Tuple[int, int]] = None

    def reset(self, why: str) -> None:
        cleared = list(self.pipeline.object_ids)
        self.used_ids.update(cleared)
        self.pipeline.reset()
        self.frame_shape = None
        self.last_stamp = None
        self.labels.clear()
        self.summary.resets += 1
        self.summary.reset_reasons.append(why)
        self.log(f"warning: tracker reset: {why}; retired ids {cleared}")

    def fresh_id(self, pending: Sequence[ObjectPrompt] = ()) -> int:
        taken = self.used_ids | set(self.pipeline.object_ids) | {p.id for p in pending}
        oid = max(taken) + 1 if taken else 1
        if oid > MAX_ID:
            raise PromptError(f"all {MAX_ID} object ids of this run are used")
        return oid

    def check_reuse(self, prompts: Sequence[ObjectPrompt]) -> None:
        live = set(self.pipeline.object_ids)
        for p in prompts:
            if p.id in self.used_ids and p.id not in live:
                raise PromptError(f"id {p.id} was used before by an object that was removed or cleared "
                                  "by a tracker reset; ids are never reused")

    def prompts_from_msg(self, msg, shape) -> Tuple[List[ObjectPrompt], Dict[int, str]]:
        """ObjectPromptArray -> pipeline prompts, with the node's checks and fresh ids for id 0."""
        h, w = shape
        out: List[ObjectPrompt] = []
        labels: Dict[int, str] = {}
        reason = prompt_msgs.problem_without_frame(msg.prompts, self.used_ids, set(self.pipeline.object_ids))
        if reason:
            raise PromptError(reason)
        for k, p in enumerate(msg.prompts):
            oid = int(p.id) or self.fresh_id(out)
            mask = None
            if p.mask.width > 0 and p.mask.height > 0:
                mask = prompt_msgs.prompt_mask(p.mask, oid, (h, w), f"prompt {k}")
            box = prompt_msgs.prompt_box(p, (h, w), f"prompt {k}")
            points = prompt_msgs.click_points(p)
            out.append(ObjectPrompt(id=oid, mask=mask, box=box, points=points))
            if p.label:
                labels[oid] = str(p.label)
        return out, labels


# ---------------------------------------------------------------------------------------------
# Output messages


class _Outputs:
    """Builds and writes the node's output messages for one result."""

    def __init__(self, writer, store, ns: str, overlay: bool, overlay_alpha: float):
        self.writer, self.store = writer, store
        self.overlay, self.alpha = overlay, overlay_alpha
        T = store.types
        self.Image, self.TrackedObject = T[IMAGE_TYPE], T["hqsmem_ros/msg/TrackedObject"]
        self.TrackedObjectArray = T[OBJECTS_TYPE]
        self.topics = {"masks": f"{ns}/masks", "objects": f"{ns}/objects"}
        if overlay:
            self.topics["overlay"] = f"{ns}/overlay"
        types = {"masks": IMAGE_TYPE, "objects": OBJECTS_TYPE, "overlay": IMAGE_TYPE}
        self.conns = {k: writer.add_connection(t, types[k], typestore=store) for k, t in self.topics.items()}

    def _image(self, header, fields) -> Any:
        return self.Image(header=header, height=fields["height"], width=fields["width"],
                          encoding=fields["encoding"], is_bigendian=int(fields["is_bigendian"]),
                          step=fields["step"], data=np.frombuffer(fields["data"], np.uint8))

    def encode(self, header, rgb, result, frame_index: int, labels: Dict[int, str]) -> List[Tuple[str, bytes]]:
        label = result.label_map()
        masks = self._image(header, image_codec.label_map_to_fields(label))
        nan = float("nan")
        objects = []
        for o in result.objects:
            cx, cy = (float(o.centroid[0]), float(o.centroid[1])) if o.visible else (nan, nan)
            x0, y0, x1, y1 = (float(v) for v in o.box)
            objects.append(self.TrackedObject(
                id=int(o.id), label=labels.get(o.id, ""), x_min=x0, y_min=y0, x_max=x1, y_max=y1,
                score=float(o.score), visible=bool(o.visible), refined=bool(o.refined), area=int(o.area),
                centroid_x=cx, centroid_y=cy))
        arr = self.TrackedObjectArray(header=header, frame_index=int(frame_index), width=int(label.shape[1]),
                                      height=int(label.shape[0]), objects=objects)
        out = [("masks", self.store.serialize_cdr(masks, IMAGE_TYPE)),
               ("objects", self.store.serialize_cdr(arr, OBJECTS_TYPE))]
        if self.overlay:
            from hqsmem_ros.io.overlay import render_overlay
            over = render_overlay(rgb, label, result.objects, self.alpha, labels)
            out.append(("overlay", self.store.serialize_cdr(self._image(header, image_codec.rgb_to_fields(over)),
                                                            IMAGE_TYPE)))
        return out


# ---------------------------------------------------------------------------------------------
# The run


SQLITE_CACHE_KIB = 64 * 1024
SQLITE_PAGE_BYTES = 65536  # sqlite's largest page size


def _speed_up_sqlite(writer) -> None:
    """sqlite3 output: 64 KiB pages (a 300 KB mask message fills 5 pages instead of 75 4-KiB
    overflow pages, each a separate write), no rollback journal or fsyncs (the bag is written in
    a staging folder and moved into place only when complete, so a crash leaves nothing
    half-written to recover) and a 64 MB page cache. Blob writes per 640x480 frame: 1.6-1.8 ms
    with sqlite's defaults, 1.2 with the journal and cache settings, 0.65 with the page size too
    (docs/benchmarks.md). Any sqlite reader (rosbag2 included) reads any page size."""
    conn = getattr(getattr(writer, "storage", None), "conn", None)
    if conn is None or not hasattr(conn, "execute"):  # mcap, or a rosbags without this layout
        return
    if not getattr(conn, "in_transaction", True):
        # The page size of an existing database changes only by rebuilding it: instant while
        # it holds nothing but the empty tables the writer has just created.
        conn.execute(f"PRAGMA page_size={SQLITE_PAGE_BYTES}")
        conn.execute("VACUUM")
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")


def _copy_connection(writer, conn, store):
    """An output connection for an input topic, with the input's definition and QoS."""
    ext = conn.ext
    qos = list(getattr(ext, "offered_qos_profiles", []) or [])
    fmt = getattr(ext, "serialization_format", "cdr")
    msgdef = conn.msgdef.data if conn.msgdef is not None else ""
    if msgdef and conn.digest and conn.digest.startswith("RIHS01_"):
        return writer.add_connection(conn.topic, conn.msgtype, msgdef=msgdef, rihs01=conn.digest,
                                     serialization_format=fmt, offered_qos_profiles=qos)
    if conn.msgtype in store.types:
        return writer.add_connection(conn.topic, conn.msgtype, typestore=store, serialization_format=fmt,
                                     offered_qos_profiles=qos)
    if msgdef:  # an older bag without type hashes: describe the type from its recorded definition
        from rosbags.typesys import Stores, get_types_from_msg, get_typestore
        own = get_typestore(Stores.EMPTY)
        own.register(get_types_from_msg(msgdef, conn.msgtype))
        return writer.add_connection(conn.topic, conn.msgtype, typestore=own, serialization_format=fmt,
                                     offered_qos_profiles=qos)
    raise BagError(f"topic {conn.topic}: type {conn.msgtype} has no recorded definition and is not a "
                   "standard type, so it cannot be copied; leave it out with --exclude-topic")


def _read_prompt_topic(reader, conn, store, bag_path) -> _RecordedPrompts:
    if conn.msgtype != PROMPTS_TYPE:
        raise BagError(f"{bag_path}: --prompt-topic {conn.topic} has type {conn.msgtype}, expected {PROMPTS_TYPE}")
    ours = store.hash_rihs01(PROMPTS_TYPE)
    if conn.digest and conn.digest.startswith("RIHS01_") and conn.digest != ours:
        raise BagError(f"{bag_path}: {conn.topic} was recorded with another definition of {PROMPTS_TYPE} "
                       f"(hash {conn.digest}, this package's: {ours}); it cannot be read safely")
    items = []
    k = 0
    try:
        for k, (_, bag_ns, raw) in enumerate(reader.messages(connections=[conn])):
            msg = store.deserialize_cdr(raw, PROMPTS_TYPE)
            if not len(msg.prompts):
                continue  # the node ignores an empty request
            stamp = stamp_ns_of(msg.header) or int(bag_ns)
            items.append((stamp, k, msg))
    except Exception as exc:
        raise BagError(f"{bag_path}: cannot read prompt message {k} on {conn.topic}: {exc}") from exc
    return _RecordedPrompts(items)


def process_bag(in_bag: Union[str, Path], out_bag: Union[str, Path], image_topic: str,
                prompts_file: Optional[Union[str, Path]] = None, prompt_topic: Optional[str] = None,
                config: Any = None, overlay: bool = False, overlay_alpha: float = 0.5,
                storage: Optional[str] = None, ns: str = DEFAULT_NS,
                exclude_topics: Sequence[str] = (), progress: bool = True, log=None,
                io_threads: Optional[bool] = None, bench: bool = False,
                allow_random_weights: bool = False) -> BagSummary:
    """Run the pipeline over IN_BAG's image topic and write OUT_BAG (see the module docstring).

    io_threads: read/decode and encode/write in two threads beside the pipeline (True), or
    everything in the calling thread except image decoding, one frame ahead in a worker (False:
    the summary's overhead is then the sum of the parts less the decoding it hid); None
    (default) = threads only when the process may use at least IO_THREADS_MIN_CORES cores. With fewer, the threads compete with the pipeline for the same cores and measured
    slower than doing the I/O in line (docs/benchmarks.md, "Offline bag processing").
    bench: first run the pipeline alone over the same frames (decoded, nothing written, no
    threads), and report the real run's time per frame against that pass's pipeline time too.

    Raises BagError (input/output problems), PromptsFileError (prompts file), ConfigError.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    in_bag, out_bag = Path(in_bag), Path(out_bag)
    if prompts_file is not None and prompt_topic is not None:
        raise BagError("give either --prompts FILE or --prompt-topic TOPIC, not both")
    if out_bag.exists():
        raise BagError(f"output bag {out_bag} exists already; remove it or choose another path")
    if out_bag.resolve() == in_bag.resolve():
        raise BagError(f"output bag {out_bag} is the input bag")
    if io_threads is None:
        io_threads = usable_cores() >= IO_THREADS_MIN_CORES
    if not 0.0 <= overlay_alpha <= 1.0:
        raise BagError(f"--overlay-alpha must be in 0..1, got {overlay_alpha}")
    if storage is not None and storage not in STORAGES:
        raise BagError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    ns = "/" + ns.strip("/") if ns.strip("/") else ""
    schedule: Optional[PromptSchedule] = load_prompts_file(prompts_file) if prompts_file is not None else None
    cfg = load_config(config)
    untrained = [f"{key} ({getattr(cfg, key).get('type')})" for key in ("tracker", "refiner", "features")
                 if getattr(cfg, key).get("random_weights") is True]
    if untrained and not allow_random_weights:  # as the node: no meaningless masks by accident
        raise BagError(f"{', '.join(untrained)}: random_weights is true, so the output masks would come from "
                       "untrained models; give the checkpoints, or --allow-random-weights (speed tests only)")
    store = make_typestore()

    reader = open_bag(in_bag)
    try:
        by_topic = {}
        for c in reader.connections:
            by_topic.setdefault(c.topic, []).append(c)
        if image_topic not in by_topic:
            raise BagError(f"{in_bag}: no topic {image_topic!r}; topics in the bag: {_topic_table(reader)}")
        image_conns = by_topic[image_topic]
        types = {c.msgtype for c in image_conns}
        if not types <= {IMAGE_TYPE, COMPRESSED_TYPE} or len(types) != 1:
            raise BagError(f"{in_bag}: topic {image_topic} has type {', '.join(sorted(types))}; expected "
                           f"{IMAGE_TYPE} or {COMPRESSED_TYPE}")
        image_type = types.pop()
        total = sum(c.msgcount for c in image_conns)
        if total == 0:
            raise BagError(f"{in_bag}: topic {image_topic} has no messages")
        excluded = set(exclude_topics)
        missing = sorted(excluded - set(by_topic))
        if missing:
            raise BagError(f"{in_bag}: --exclude-topic {', '.join(missing)} not in the bag; topics: {_topic_table(reader)}")
        if image_topic in excluded:
            raise BagError(f"the image topic {image_topic} cannot be excluded: its frames are what is processed")
        out_topics = [f"{ns}/masks", f"{ns}/objects"] + ([f"{ns}/overlay"] if overlay else [])
        clash = [t for t in out_topics if t in by_topic and t not in excluded]
        if clash:
            raise BagError(f"{in_bag} already has topic(s) {', '.join(clash)} (a recording of the node?); "
                           "choose another --ns or leave them out with --exclude-topic")
        recorded = None
        if prompt_topic is not None:
            if prompt_topic not in by_topic:
                raise BagError(f"{in_bag}: no prompt topic {prompt_topic!r}; topics in the bag: {_topic_table(reader)}")
            recorded = _read_prompt_topic(reader, by_topic[prompt_topic][0], store, in_bag)

        out_storage = storage or bag_storage(in_bag)
        summary = BagSummary(str(in_bag), str(out_bag), out_storage, image_topic, image_type,
                             io_threads=io_threads,
                             image_decoder=image_codec.jpeg_decoder() if image_type == COMPRESSED_TYPE else "")
        if bench:
            # The pipeline alone on the same frames, same process, nothing beside it: the
            # reference for what the real run below adds.
            alone = BagSummary(str(in_bag), "", out_storage, image_topic, image_type, io_threads=False)
            again = load_prompts_file(prompts_file) if prompts_file is not None else None
            replay = (_read_prompt_topic(reader, by_topic[prompt_topic][0], store, in_bag)
                      if prompt_topic is not None else None)
            log("hqsmem bag --bench: first pass, the pipeline alone (no output)")
            _run(reader, None, store, HQSMemPipeline(cfg), alone, image_conns, again, replay, excluded, ns,
                 False, overlay_alpha, Progress(total, enabled=progress), lambda text: None, False)
            summary.bench_pipeline_alone_s = alone.seconds["pipeline"]
            log("hqsmem bag --bench: second pass, the real run")
        pipeline = HQSMemPipeline(cfg)
        try:
            out_bag.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out_bag.name}.partial-", dir=out_bag.parent))
        except OSError as exc:
            raise BagError(f"cannot write beside output bag {out_bag}: {exc.strerror or exc}") from exc
        plugin = StoragePlugin.MCAP if out_storage == "mcap" else StoragePlugin.SQLITE3

        def open_writer():
            writer = Writer(staging / out_bag.name, version=8, storage_plugin=plugin)
            writer.open()
            _speed_up_sqlite(writer)
            return writer

        try:
            _run(reader, open_writer, store, pipeline, summary, image_conns, schedule, recorded,
                 excluded, ns, overlay, overlay_alpha, Progress(total, enabled=progress), log, io_threads)
            try:
                os.replace(staging / out_bag.name, out_bag)
            except OSError as exc:  # e.g. OUT_BAG was created by someone else meanwhile
                raise BagError(f"cannot move the finished bag to {out_bag}: {exc.strerror or exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        reader.close()

    if schedule is not None:
        summary.prompts_never_applied = [f"{e.source} at {e.when}" for e in schedule.pending()]
    if recorded is not None:
        summary.prompts_never_applied = [f"{prompt_topic} message stamped {format_stamp(s)}"
                                         for s, _, _ in recorded.waiting]
    if summary.prompts_never_applied:
        summary.warnings.append(f"{len(summary.prompts_never_applied)} prompt entries/messages were never "
                                "applied (stamped or indexed after the last image)")
    if summary.results + summary.dropped_total != summary.frames_in:  # the invariant the summary states
        raise AssertionError(f"frame accounting broken: {summary.results} results + {summary.dropped_total} "
                             f"dropped != {summary.frames_in} frames in")
    if summary.frames_in != total:
        summary.warnings.append(f"the bag's metadata lists {total} images on {image_topic} but "
                                f"{summary.frames_in} were read")
    return summary


class _Stop(Exception):
    """The main loop ended early: the I/O threads stop."""


_END = object()


class _InputThread(threading.Thread):
    """Reads the bag, deserializes and decodes images ahead of the pipeline (bounded queue).

    Items: ("copy", conn, bag_ns, raw) for every message, then for images
    ("image", conn, bag_ns, msg or None, rgb or None, error or None). Decoding here, in input
    order, keeps the output identical to a single-threaded run.
    """

    def __init__(self, reader, store, image_ids, compressed: bool, bag_path: str, depth: int = 8):
        super().__init__(name="hqsmem_bag_input", daemon=True)
        self.reader, self.store, self.image_ids, self.compressed = reader, store, image_ids, compressed
        self.bag_path = bag_path
        self.queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.spent = Counter()

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stop()

    def produce(self):
        """The items, read and decoded in this thread (the thread's loop, or a synchronous run)."""
        return self._read_items(decode=True)

    def _read_items(self, decode: bool = False):
        """("copy", ...) for every message and, after each image's copy, its "image" item: with
        pixels (decode=True) or with only the deserialized message (decode=False)."""
        clock, cpu = time.perf_counter, time.thread_time
        n_read = 0
        messages = self.reader.messages()
        while True:
            t0, c0 = clock(), cpu()
            try:
                item = next(messages, None)
            except Exception as exc:  # a corrupt chunk/page in the middle of the file
                raise BagError(f"cannot read bag {self.bag_path} after {n_read} messages (truncated or "
                               f"corrupt?): {type(exc).__name__}: {exc}") from exc
            self.spent["read"] += clock() - t0
            if item is None:
                self.spent["cpu_input"] += cpu() - c0
                return
            n_read += 1
            conn, bag_ns, raw = item
            image = None
            if conn.id in self.image_ids:
                image = self._decode(conn, bag_ns, raw) if decode else self._deserialize(conn, bag_ns, raw)
            self.spent["cpu_input"] += cpu() - c0
            yield ("copy", conn, bag_ns, raw)
            if image is not None:
                yield image

    def run(self) -> None:
        try:
            for item in self.produce():
                self._put(item)
            self._put(_END)
        except _Stop:
            return
        except BaseException as exc:  # handed to the main thread, which raises it
            try:
                self._put(("error", exc))
            except _Stop:
                pass

    def _decode(self, conn, bag_ns, raw):
        """An image message -> its "image" item, pixels decoded now."""
        item = self._deserialize(conn, bag_ns, raw)
        if item[3] is None:
            return item
        t0 = time.perf_counter()
        rgb, error = self._pixels(item[3])
        self.spent["decode"] += time.perf_counter() - t0
        return item[:4] + (rgb, error)

    def _deserialize(self, conn, bag_ns, raw):
        """("image", conn, bag_ns, msg, None, None), or the item of an undecodable message."""
        t0 = time.perf_counter()
        try:
            msg = self.store.deserialize_cdr(raw, conn.msgtype)
            return ("image", conn, bag_ns, msg, None, None)
        except Exception as exc:
            return ("image", conn, bag_ns, None, None,
                    ("bad_message", f"cannot deserialize {conn.msgtype}: {type(exc).__name__}: {exc}"))
        finally:
            self.spent["decode"] += time.perf_counter() - t0

    def _pixels(self, msg):
        """(rgb, None) or (None, ("bad_image", reason))."""
        try:
            rgb = image_codec.compressed_to_rgb(msg) if self.compressed else image_codec.image_to_rgb(msg)
            return rgb, None
        except ImageDecodeError as exc:
            return None, ("bad_image", str(exc))

    def produce_decoding_ahead(self):
        """produce()'s items in the same order, with each image's pixels decoded in a worker thread
        while the consumer still works on the previous image: the items up to an image are handed
        out only once the next image's decoding has started. One frame ahead, so memory stays
        bounded; decoding releases the GIL, so it overlaps the pipeline even on two cores."""
        from concurrent.futures import ThreadPoolExecutor

        def pixels_timed(msg):  # runs in the worker: its wall and CPU time are the decoding's cost
            t0, c0 = time.perf_counter(), time.thread_time()
            out = self._pixels(msg)
            self.spent["decode_worker"] += time.perf_counter() - t0  # keys only the worker writes
            self.spent["cpu_decode_worker"] += time.thread_time() - c0
            return out

        def ready(item):  # the main thread's wait for it counts as waiting for input (_run)
            if item[0] != "image" or not hasattr(item[4], "result"):
                return item
            return item[:4] + item[4].result()

        held: List[tuple] = []  # items since the last hand-out: at most one image, being decoded
        held_image = False
        with ThreadPoolExecutor(1, thread_name_prefix="hqsmem_bag_decode") as worker:
            for item in self._read_items():
                is_image = item[0] == "image"
                if is_image and item[3] is not None:
                    item = item[:4] + (worker.submit(pixels_timed, item[3]), None)
                if is_image and held_image:  # the next image is on its way: hand out the last one
                    for h in held:
                        yield ready(h)
                    held = []
                held.append(item)
                held_image = held_image or is_image
            for h in held:
                yield ready(h)
        self.spent["decode"] += self.spent.pop("decode_worker", 0.0)
        self.spent["cpu_input"] += self.spent.pop("cpu_decode_worker", 0.0)


class _Sink:
    """Opens the output bag, encodes results into the node's messages and writes everything in
    submission order; then closes the bag. Runs in the calling thread (io_threads=False);
    _SinkThread runs the same in its own thread. The bag writer is used by one thread only
    (sqlite3 connections must stay in the thread that made them)."""

    def __init__(self, open_writer, in_connections, excluded, store, ns, overlay, overlay_alpha, out_path):
        self.open_writer, self.in_connections, self.excluded = open_writer, in_connections, excluded
        self.store, self.ns, self.overlay, self.overlay_alpha = store, ns, overlay, overlay_alpha
        self.out_path = out_path
        self.writer = None
        self.copies: Dict[int, Any] = {}
        self.outputs: Optional[_Outputs] = None
        self.error: Optional[BaseException] = None
        self.spent = Counter()
        self.written = Counter()
        self.closed = False

    # -- the work ---------------------------------------------------------------------------
    def open(self) -> None:
        self.writer = self.open_writer()
        self.copies = {c.id: _copy_connection(self.writer, c, self.store) for c in self.in_connections
                       if c.topic not in self.excluded}
        self.outputs = _Outputs(self.writer, self.store, self.ns, self.overlay, self.overlay_alpha)

    def handle(self, item) -> None:
        c0 = time.thread_time()
        try:
            self._handle(item)
        finally:
            self.spent["cpu_output"] += time.thread_time() - c0

    def _handle(self, item) -> None:
        from rosbags.rosbag2 import WriterError

        clock = time.perf_counter
        if item[0] == "copy":  # ("copy", input connection, bag_ns, raw)
            out = self.copies.get(item[1].id)
            writes = [(out, item[2], item[3])] if out is not None else []
        else:  # ("result", header, rgb, result, frame_index, labels, bag_ns)
            _, header, rgb, result, frame_index, labels, bag_ns = item
            t0 = clock()
            encoded = self.outputs.encode(header, rgb, result, frame_index, labels)
            self.spent["encode"] += clock() - t0
            writes = [(self.outputs.conns[key], bag_ns, data) for key, data in encoded]
        for conn, bag_ns, data in writes:
            t0 = clock()
            try:
                self.writer.write(conn, bag_ns, data)
            except (OSError, WriterError) as exc:
                raise BagError(f"cannot write output bag {self.out_path}: {exc}") from exc
            self.spent["write"] += clock() - t0
            self.written[conn.topic] += 1

    def close(self) -> None:
        from rosbags.rosbag2 import WriterError

        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            self.writer.close()
        except (OSError, WriterError) as exc:
            raise BagError(f"cannot finish output bag {self.out_path}: {exc}") from exc
        self.spent["write"] += time.perf_counter() - t0
        self.spent["cpu_output"] += time.thread_time() - c0
        self.closed = True

    def discard(self) -> None:
        """After a failure: release the files (the caller removes the partial bag)."""
        if self.writer is not None and not self.closed:
            try:
                self.writer.close()
            except Exception:
                pass
            self.closed = True

    def output_topics(self) -> List[str]:
        return [c.topic for c in self.outputs.conns.values()] if self.outputs is not None else []

    # -- driving it -------------------------------------------------------------------------
    def start(self) -> None:
        self.open()

    def put(self, item) -> None:
        self.handle(item)

    def finish(self) -> None:
        self.close()

    def stop(self) -> None:
        self.discard()


class _SinkThread(_Sink):
    """_Sink in its own thread, fed through a bounded queue."""

    def __init__(self, *args, depth: int = 8):
        super().__init__(*args)
        self.queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self.abort = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="hqsmem_bag_output", daemon=True)

    def _loop(self) -> None:
        try:
            self.open()
            while not self.abort.is_set():
                try:
                    item = self.queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _END:
                    self.close()
                    return
                self.handle(item)
        except BaseException as exc:  # the main thread raises it on its next put / at the end
            self.error = exc
        self.discard()

    def start(self) -> None:
        self.thread.start()

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            if not self.thread.is_alive():
                raise BagError(f"the writer of {self.out_path} stopped")
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self.put(_END)
        self.thread.join()
        if self.error is not None:
            raise self.error
        if not self.closed:
            raise BagError(f"the writer of {self.out_path} stopped before closing the bag")

    def stop(self) -> None:
        self.abort.set()
        self.thread.join(timeout=30)


class _Discard(_Sink):
    """--bench's first pass: no output bag; results are dropped on the floor."""

    def __init__(self):
        super().__init__(None, (), (), None, "", False, 0.0, "")

    def start(self) -> None:
        pass

    def put(self, item) -> None:
        pass

    def finish(self) -> None:
        pass

    def stop(self) -> None:
        pass


def _run(reader, open_writer, store, pipeline, summary: BagSummary, image_conns, schedule, recorded,
         excluded, ns, overlay, overlay_alpha, progress: Progress, log, io_threads: bool = True) -> None:
    """The frame loop. open_writer: () -> an opened rosbags Writer, or None for --bench's first pass."""
    clock = time.perf_counter
    spent = Counter()
    stage_sums = Counter()
    wall0 = clock()
    node = _NodeState(pipeline, summary, log)
    objects_seen = set()
    source = _InputThread(reader, store, {c.id for c in image_conns}, summary.image_type == COMPRESSED_TYPE,
                          summary.in_bag)
    if open_writer is None:
        sink: _Sink = _Discard()
    else:
        sink = (_SinkThread if io_threads else _Sink)(open_writer, reader.connections, excluded, store, ns,
                                                      overlay, overlay_alpha, summary.out_bag)
    items = None if io_threads else source.produce_decoding_ahead()

    def next_item():
        if items is None:
            return source.queue.get()
        return next(items, _END)

    def drop(reason: str, stamp_ns: Optional[int], message: str) -> None:
        summary.dropped[reason] = summary.dropped.get(reason, 0) + 1
        when = f"stamp {format_stamp(stamp_ns)}" if stamp_ns is not None else "unknown stamp"
        text = f"frame {summary.frames_in - 1} at {when}: {message}"
        if len(summary.dropped_examples) < 10:
            summary.dropped_examples.append(text)
        log(f"warning: dropped {text}")

    finished = False
    cpu0 = time.process_time()
    try:
        sink.start()
        if io_threads:
            source.start()
        while True:
            t0 = clock()
            item = next_item()
            spent["wait_input"] += clock() - t0
            if item is _END:
                break
            if item[0] == "error":
                raise item[1]
            if item[0] == "copy":
                t0 = clock()
                sink.put(item)
                spent["wait_output"] += clock() - t0
                continue
            _, conn, bag_ns, msg, rgb, error = item
            summary.frames_in += 1
            index = summary.frames_in - 1
            if error is not None:
                drop(error[0], stamp_ns_of(msg.header) if msg is not None else None, error[1])
                progress.update(summary.frames_in)
                continue
            stamp_ns = stamp_ns_of(msg.header)
            result, prompts, remove, labels, reason = _process_frame(
                node, pipeline, summary, schedule, recorded, index, stamp_ns, msg, rgb, log, clock, spent)
            if result is None:
                drop("bad_frame", stamp_ns, reason)
                progress.update(summary.frames_in)
                continue
            node.used_ids.update(p.id for p in prompts)
            node.labels.update(labels)
            for oid in remove:
                node.labels.pop(oid, None)
            for stage, sec in result.timings.items():
                stage_sums[stage] += sec
            objects_seen.update(result.masks)
            t0 = clock()
            sink.put(("result", msg.header, rgb, result, node.frame_index, dict(node.labels), bag_ns))
            spent["wait_output"] += clock() - t0
            node.frame_index += 1
            summary.results += 1
            progress.update(summary.frames_in)
        t0 = clock()
        sink.finish()
        spent["finish"] += clock() - t0
        finished = True
    finally:
        source.stop.set()
        if io_threads and source.is_alive():
            source.join(timeout=30)
        if not finished:
            sink.stop()
    progress.finish(summary.frames_in)
    spent["wall"] = clock() - wall0
    spent["cpu_total"] = time.process_time() - cpu0
    busy = Counter(source.spent) + Counter(sink.spent)
    summary.seconds = {k: float(busy.get(k, spent.get(k, 0.0))) for k in TIMED_PARTS + ("wall",)}
    summary.seconds.update({k: float(spent[k]) for k in STALLS + ("cpu_total",)})
    summary.seconds.update({k: float(busy[k]) for k in ("cpu_input", "cpu_output")})
    summary.stage_ms = {k: 1000.0 * v / max(1, summary.results) for k, v in stage_sums.items()}
    summary.objects_seen = sorted(int(i) for i in objects_seen)
    summary.topics_written = dict(sink.written)
    for topic in sink.output_topics():
        summary.topics_written.setdefault(topic, 0)


def _process_frame(node: "_NodeState", pipeline, summary, schedule, recorded, index, stamp_ns, msg, rgb,
                   log, clock, spent):
    """Resets, this frame's requests and the pipeline, as the node does for one image.

    Returns (result, prompts, remove, labels, applied) or (None, ..., reason) for a dropped frame.
    """
    stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9  # as the node computes it
    if node.last_stamp is not None and stamp < node.last_stamp:
        node.reset(f"image stamps went back from {node.last_stamp:.6f} to {stamp:.6f} at frame {index} (looping bag?)")
    if node.frame_shape is not None and rgb.shape[:2] != node.frame_shape:
        h0, w0 = node.frame_shape
        node.reset(f"image size changed from {w0}x{h0} to {rgb.shape[1]}x{rgb.shape[0]} at frame {index}")

    # Requests for this frame: prompts-file entries (errors stop the run) or one recorded message
    # (refused like the node refuses it, and the frame goes on without it).
    file_entries: List[PromptEntry] = []
    prompts: List[ObjectPrompt] = []
    remove: List[int] = []
    labels: Dict[int, str] = {}
    taken = None
    if schedule is not None:
        file_entries = schedule.due(index, stamp_ns)
        if file_entries:
            prompts, remove, labels = schedule.prompts_for(file_entries, rgb.shape[:2])
            try:
                node.check_reuse(prompts)
            except PromptError as exc:
                raise PromptsFileError(_entries_error(file_entries, index, stamp_ns, exc)) from exc
    elif recorded is not None:
        taken = recorded.take(stamp_ns)
        if taken is not None:
            try:
                prompts, labels = node.prompts_from_msg(taken[1], rgb.shape[:2])
            except PromptError as exc:
                _refuse(summary, log, taken[0], exc)
                taken, prompts, labels = None, [], {}

    t0 = clock()
    try:
        try:
            result = pipeline.process(rgb, stamp, prompts=prompts, remove=remove)
        except PromptError as exc:
            if file_entries:
                raise PromptsFileError(_entries_error(file_entries, index, stamp_ns, exc)) from exc
            _refuse(summary, log, taken[0], exc)
            taken, prompts, labels = None, [], {}
            result = pipeline.process(rgb, stamp)
    except FrameError as exc:
        spent["pipeline"] += clock() - t0
        if taken is not None:
            recorded.put_back(taken)  # the node keeps a request for the next frame
        return None, [], [], {}, str(exc)
    spent["pipeline"] += clock() - t0
    if file_entries:
        schedule.mark_applied(file_entries)
        summary.prompts_applied += len(file_entries)
    if taken is not None:
        summary.prompts_applied += 1
    node.frame_shape = rgb.shape[:2]
    node.last_stamp = stamp
    return result, prompts, remove, labels, True


def _entries_error(entries: Sequence[PromptEntry], index: int, stamp_ns: int, exc: Exception) -> str:
    names = "; ".join(e.source for e in entries)
    return f"{names}: cannot apply on frame {index} (stamp {format_stamp(stamp_ns)}): {exc}"


def _refuse(summary: BagSummary, log, stamp_ns: int, exc: Exception) -> None:
    summary.prompts_refused += 1
    text = f"prompt message stamped {format_stamp(stamp_ns)}: {exc}"
    summary.refused_reasons.append(text)
    log(f"warning: refused {text}")


# ---------------------------------------------------------------------------------------------
# Reading results back (tests, tools)


def read_outputs(bag: Union[str, Path], ns: str = DEFAULT_NS) -> Dict[str, List[Tuple[int, Any]]]:
    """{topic: [(bag time ns, deserialized message)]} of a bag's output topics (masks, objects, overlay)."""
    store = make_typestore()
    reader = open_bag(bag)
    try:
        wanted = [c for c in reader.connections if c.topic.startswith(ns.rstrip("/") + "/")]
        out: Dict[str, List[Tuple[int, Any]]] = {c.topic: [] for c in wanted}
        for conn, bag_ns, raw in (reader.messages(connections=wanted) if wanted else ()):
            out[conn.topic].append((bag_ns, store.deserialize_cdr(raw, conn.msgtype)))
    finally:
        reader.close()
    return out


def verify_outputs(out_bag: Union[str, Path], image_topic: str, ns: str = DEFAULT_NS) -> Dict[str, Any]:
    """Read an output bag back and check it against its own copy of the image topic.

    Returns counts and problems: images without exactly one masks and one objects message of the
    same bag time and header stamp, outputs without an image, frames whose mask ids differ from
    the objects marked visible. `problems` is empty when nothing was lost or mixed up.
    """
    store = make_typestore()
    reader = open_bag(out_bag)
    ns = ns.rstrip("/")
    images: List[Tuple[int, int]] = []
    masks: Dict[Tuple[int, int], List[set]] = {}
    objects: Dict[Tuple[int, int], List[set]] = {}
    try:
        for conn, bag_ns, raw in reader.messages():
            if conn.topic == image_topic:
                msg = store.deserialize_cdr(raw, conn.msgtype)
                images.append((bag_ns, stamp_ns_of(msg.header)))
            elif conn.topic == f"{ns}/masks":
                msg = store.deserialize_cdr(raw, conn.msgtype)
                ids = set(np.unique(image_codec.mask_from_msg(msg)).tolist()) - {0}
                masks.setdefault((bag_ns, stamp_ns_of(msg.header)), []).append(ids)
            elif conn.topic == f"{ns}/objects":
                msg = store.deserialize_cdr(raw, conn.msgtype)
                ids = {int(o.id) for o in msg.objects if o.visible}
                objects.setdefault((bag_ns, stamp_ns_of(msg.header)), []).append(ids)
    finally:
        reader.close()
    problems: List[str] = []
    for key in images:
        m, o = masks.get(key, []), objects.get(key, [])
        if len(m) != 1 or len(o) != 1:
            problems.append(f"image at bag time {key[0]} (stamp {format_stamp(key[1])}): {len(m)} masks and "
                            f"{len(o)} objects messages")
        elif m[0] != o[0]:
            problems.append(f"image at stamp {format_stamp(key[1])}: mask ids {sorted(m[0])} but visible "
                            f"objects {sorted(o[0])}")
    stray = (set(masks) | set(objects)) - set(images)
    problems += [f"output at bag time {k[0]} (stamp {format_stamp(k[1])}) has no image" for k in sorted(stray)]
    return {"images": len(images), "masks": sum(len(v) for v in masks.values()),
            "objects": sum(len(v) for v in objects.values()), "problems": problems}
