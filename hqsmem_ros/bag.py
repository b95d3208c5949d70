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

With --depth-topic (an aligned depth image topic, 16UC1 mm or 32FC1 m) and its camera_info
(--depth-camera-info-topic, default: the depth topic's sibling `camera_info`), every result also
carries the node's 3D fields (per object position, size, valid points; the array's frame_id_3d,
depth stamp and status_3d): before a colour frame is processed, the depth messages stamped up
to its stamp + depth_tolerance are handed to the same core.depth3d.Depth3D the node uses (the
node with depth_wait 0). Frames without 3D keep their 2D result and are counted per reason in
the summary (BagSummary.depth). ~/points is not written.

<ns> defaults to /hqsmem_node, the node's default name, so tools that read a recording of the
live node read this bag the same way. The messages are those the node publishes for the same
frame and requests, because both step the same hqsmem_ros.stream.StreamSession: image stamps
that go back (a looping bag) or a change of image size reset the tracker (ids are retired, a
warning is printed and the reset counted); one recorded prompt message is applied per frame,
like the node's ~/prompts. Reading, decoding and writing are in hqsmem_ros/io/ (bagfiles,
bag_stream).

Nothing is lost silently: every image of the topic either has one masks and one objects message
in the output, or is counted as dropped (undecodable, or refused by the pipeline) with its
reason; a dropped image has NO masks/objects message (it stays an input topic). The summary
reports frames in = results + dropped. The output is written to a hidden folder beside OUT_BAG
and moved in place only when complete. Same bag, same config -> the same output messages.

With 4 or more usable cores, reading + decoding and encoding + writing run in two threads
beside the pipeline (the frame order is kept), so bag I/O overlaps the pipeline; with fewer, or
with io_threads=False, everything else runs in one thread and only the image decoding runs one
frame ahead in a worker thread (libjpeg-turbo and OpenCV release the GIL, so it fills the
pipeline's idle moments instead of waiting for them). The summary splits the time per frame into
the pipeline's own time and what offline processing adds, and gives the CPU time that bag I/O
costs (see BagSummary.timing).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from hqsmem_ros.core.config import ConfigError, load_config
from hqsmem_ros.core.pipeline import HQSMemPipeline
from hqsmem_ros.io import image_codec
from hqsmem_ros.io.bag_stream import (_END, CAMERA_INFO_TYPE, DepthFeed, _Discard, _InputThread, _Sink,
                                      _SinkThread, _speed_up_sqlite)
from hqsmem_ros.io.bagfiles import (COMPRESSED_TYPE, DEFAULT_NS, IMAGE_TYPE, PROMPTS_TYPE,  # noqa: F401
                                    STORAGES, BagError, bag_storage, make_typestore, open_bag,
                                    read_outputs, stamp_ns_of, topic_table, verify_outputs)
from hqsmem_ros.io.prompts_file import PromptSchedule, format_stamp, load_prompts_file
from hqsmem_ros.progress import Progress
from hqsmem_ros.stream.session import Request, StreamSession
from hqsmem_ros.staging import make_staging

# I/O threads beside the pipeline pay from 2 cores on since the default tracker got faster (raw
# 640x480: 17.5 % overhead in line against 9.4 % threaded, docs/benchmarks.md "Offline bag processing").
IO_THREADS_MIN_CORES = 2


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
    depth: Dict[str, int] = field(default_factory=dict)  # --depth-topic: Depth3D's counts (3D per reason)

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
        if self.depth:
            no3d = ", ".join(f"{k[6:]} {v}" for k, v in sorted(self.depth.items()) if k.startswith("no_3d.") and v)
            lines.append(f"  3D: {self.depth.get('frames_3d', 0)} of {self.results} results"
                         + (f"; without 3D (2D kept): {no3d}" if no3d else "")
                         + f"; depth messages {self.depth.get('pairing.depth_received', 0)}, refused "
                           f"{self.depth.get('bad_depth', 0)}, camera_info refused {self.depth.get('bad_camera_info', 0)}")
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
                exclude_topics: Sequence[str] = (),
                progress: Union[bool, Callable[[int, int], None]] = True, log=None,
                io_threads: Optional[bool] = None, bench: bool = False,
                allow_random_weights: bool = False,
                max_image_pixels: Optional[int] = None, depth_topic: Optional[str] = None,
                depth_info_topic: Optional[str] = None, depth_params: Any = None,
                pipeline: Optional[HQSMemPipeline] = None) -> BagSummary:
    """Run the pipeline over IN_BAG's image topic and write OUT_BAG (see the module docstring).

    progress: True = a line on stderr, False = none, or progress(frames done, total) per image.
    pipeline: one built from this `config` before (models loaded once for many bags), reset
    before each pass (so the output is a fresh pipeline's); None: built here.

    io_threads: read/decode and encode/write in two threads beside the pipeline (True), or all in
    the calling thread but image decoding, one frame ahead in a worker (False); None (default) =
    threads only with at least IO_THREADS_MIN_CORES usable cores (on one they only compete with
    the pipeline: a `hqsmem bags` worker pinned to one core runs in line).
    bench: first run the pipeline alone over the same frames (_bench_pipeline_alone), and report
    the real run's time per frame against that pass's pipeline time too.

    max_image_pixels: images larger than this (width x height, from the message or the
    compressed header, checked before decoding) are dropped as bad_image; None = the node's
    default (image_codec.DEFAULT_MAX_PIXELS).

    depth_topic / depth_info_topic: 3D as the node's use_depth (module docstring);
    depth_params: a core.depth3d.DepthParams (default: the node's defaults).

    Raises BagError (input/output problems), PromptsFileError (prompts file), ConfigError.
    """
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    in_bag, out_bag = Path(in_bag), Path(out_bag)
    if io_threads is None:
        io_threads = usable_cores() >= IO_THREADS_MIN_CORES
    ns = _check_arguments(in_bag, out_bag, prompts_file, prompt_topic, overlay_alpha, storage, ns)
    if max_image_pixels is not None and max_image_pixels < 1:
        raise BagError(f"--max-image-pixels must be at least 1, got {max_image_pixels}")
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
        by_topic, image_conns, image_type, total, excluded = _inputs(reader, in_bag, image_topic, exclude_topics,
                                                                     ns, overlay)
        recorded = None
        if prompt_topic is not None:
            if prompt_topic not in by_topic:
                raise BagError(f"{in_bag}: no prompt topic {prompt_topic!r}; topics in the bag: {topic_table(reader)}")
            recorded = _read_prompt_topic(reader, by_topic[prompt_topic][0], store, in_bag)
        depth = _depth_inputs(by_topic, reader, in_bag, depth_topic, depth_info_topic, depth_params)
        out_storage = storage or bag_storage(in_bag)
        summary = BagSummary(str(in_bag), str(out_bag), out_storage, image_topic, image_type,
                             io_threads=io_threads,
                             image_decoder=image_codec.jpeg_decoder() if image_type == COMPRESSED_TYPE else "")
        if bench:
            summary.bench_pipeline_alone_s = _bench_pipeline_alone(
                reader, store, _fresh(pipeline, cfg), summary, image_conns, prompts_file,
                by_topic[prompt_topic][0] if prompt_topic is not None else None, excluded, ns,
                overlay_alpha, Progress(total, enabled=progress is True), log, max_image_pixels)
        bar = Progress(total, enabled=progress is True, callback=None if isinstance(progress, bool) else progress)
        _write(reader, out_bag, out_storage, store, _fresh(pipeline, cfg), summary, image_conns, schedule, recorded,
               excluded, ns, overlay, overlay_alpha, bar, log, io_threads, max_image_pixels, depth=depth)
    finally:
        reader.close()
    _finish_summary(summary, schedule, recorded, prompt_topic, image_topic, total)
    return summary


def _bench_pipeline_alone(reader, store, pipeline, summary, image_conns, prompts_file, prompt_conn, excluded,
                          ns, overlay_alpha, bar, log, max_pixels) -> float:
    """--bench's first pass, the reference for what the real run adds: the pipeline alone on the
    same frames in the same process, no output, no threads. Returns its pipeline seconds."""
    alone = BagSummary(summary.in_bag, "", summary.storage, summary.image_topic, summary.image_type, io_threads=False)
    schedule = load_prompts_file(prompts_file) if prompts_file is not None else None
    recorded = _read_prompt_topic(reader, prompt_conn, store, Path(summary.in_bag)) if prompt_conn is not None else None
    log("hqsmem bag --bench: first pass, the pipeline alone (no output)")
    _run(reader, None, store, pipeline, alone, image_conns, schedule, recorded, excluded, ns,
         False, overlay_alpha, bar, lambda text: None, False, max_pixels=max_pixels)
    log("hqsmem bag --bench: second pass, the real run")
    return alone.seconds["pipeline"]


def _depth_inputs(by_topic, reader, in_bag: Path, depth_topic, info_topic, params):
    """(depth connections, camera_info connections, DepthParams) for --depth-topic, or None."""
    if depth_topic is None:
        if info_topic is not None:
            raise BagError("--depth-camera-info-topic needs --depth-topic")
        return None
    from hqsmem_ros.core.depth3d import DepthError, DepthParams

    if info_topic is None:
        info_topic = depth_topic.rsplit("/", 1)[0] + "/camera_info" if "/" in depth_topic.strip("/") else "camera_info"
    for topic, want in ((depth_topic, IMAGE_TYPE), (info_topic, CAMERA_INFO_TYPE)):
        if topic not in by_topic:
            raise BagError(f"{in_bag}: no topic {topic!r} (--depth-topic / --depth-camera-info-topic); topics in "
                           f"the bag: {topic_table(reader)}")
        types = {c.msgtype for c in by_topic[topic]}
        if types != {want}:
            raise BagError(f"{in_bag}: topic {topic} has type {', '.join(sorted(types))}; expected {want}")
    params = params or DepthParams()
    try:
        params.validate()
    except DepthError as exc:
        raise BagError(f"depth parameters: {exc}") from exc
    return by_topic[depth_topic], by_topic[info_topic], params


def _fresh(pipeline: Optional[HQSMemPipeline], cfg) -> HQSMemPipeline:
    """The given pipeline reset (no object, memory, size or clock of an earlier run; ConfigError
    if it was built from another config), or a new one."""
    if pipeline is None:
        return HQSMemPipeline(cfg)
    if pipeline.config.to_dict() != cfg.to_dict():
        raise ConfigError("process_bag: the pipeline given was built from another config than the one given")
    pipeline.reset()
    return pipeline


def _check_arguments(in_bag: Path, out_bag: Path, prompts_file, prompt_topic, overlay_alpha, storage, ns) -> str:
    """Problems with the arguments alone (BagError); returns the normalized namespace."""
    if prompts_file is not None and prompt_topic is not None:
        raise BagError("give either --prompts FILE or --prompt-topic TOPIC, not both")
    if out_bag.exists():
        raise BagError(f"output bag {out_bag} exists already; remove it or choose another path")
    if out_bag.resolve() == in_bag.resolve():
        raise BagError(f"output bag {out_bag} is the input bag")
    if not 0.0 <= overlay_alpha <= 1.0:
        raise BagError(f"--overlay-alpha must be in 0..1, got {overlay_alpha}")
    if storage is not None and storage not in STORAGES:
        raise BagError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    return "/" + ns.strip("/") if ns.strip("/") else ""


def _inputs(reader, in_bag: Path, image_topic: str, exclude_topics, ns: str, overlay: bool):
    """(connections by topic, image connections, image type, image count, excluded topics), or BagError."""
    by_topic = {}
    for c in reader.connections:
        by_topic.setdefault(c.topic, []).append(c)
    if image_topic not in by_topic:
        raise BagError(f"{in_bag}: no topic {image_topic!r}; topics in the bag: {topic_table(reader)}")
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
        raise BagError(f"{in_bag}: --exclude-topic {', '.join(missing)} not in the bag; topics: {topic_table(reader)}")
    if image_topic in excluded:
        raise BagError(f"the image topic {image_topic} cannot be excluded: its frames are what is processed")
    out_topics = [f"{ns}/masks", f"{ns}/objects"] + ([f"{ns}/overlay"] if overlay else [])
    clash = [t for t in out_topics if t in by_topic and t not in excluded]
    if clash:
        raise BagError(f"{in_bag} already has topic(s) {', '.join(clash)} (a recording of the node?); "
                       "choose another --ns or leave them out with --exclude-topic")
    return by_topic, image_conns, image_type, total, excluded


def _write(reader, out_bag: Path, out_storage: str, store, pipeline, summary, image_conns, schedule, recorded,
           excluded, ns, overlay, overlay_alpha, progress, log, io_threads, max_pixels=None, depth=None) -> None:
    """The real run: into a hidden staging folder beside OUT_BAG, moved in place when complete."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    try:
        out_bag.parent.mkdir(parents=True, exist_ok=True)
        # (a killed run's folder is removed here: staging.make_staging)
        staging = make_staging(out_bag.parent, f".{out_bag.name}.partial-")
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
             excluded, ns, overlay, overlay_alpha, progress, log, io_threads, max_pixels=max_pixels, depth=depth)
        try:
            os.replace(staging / out_bag.name, out_bag)
        except OSError as exc:  # e.g. OUT_BAG was created by someone else meanwhile
            raise BagError(f"cannot move the finished bag to {out_bag}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _finish_summary(summary: BagSummary, schedule, recorded, prompt_topic, image_topic: str, total: int) -> None:
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


def _run(reader, open_writer, store, pipeline, summary: BagSummary, image_conns, schedule, recorded,
         excluded, ns, overlay, overlay_alpha, progress: Progress, log, io_threads: bool = True,
         max_pixels: Optional[int] = None, depth=None) -> None:
    """The frame loop. open_writer: () -> an opened rosbags Writer, or None for --bench's first pass.
    depth: (depth connections, camera_info connections, DepthParams) or None."""
    clock = time.perf_counter
    spent = Counter()
    wall0 = clock()
    feed = None
    d3 = None
    if depth is not None:
        from hqsmem_ros.core.depth3d import Depth3D
        d3 = Depth3D(depth[2])
        feed = DepthFeed(open_bag(summary.in_bag), store, depth[0], depth[1], d3, summary.in_bag)
    session = StreamSession(pipeline, schedule=schedule, schedule_errors="raise",
                            log=lambda level, text: log(f"{level}: {text}") if level != "info" else None,
                            depth=d3)
    objects_seen = set()
    source = _InputThread(reader, store, {c.id for c in image_conns}, summary.image_type == COMPRESSED_TYPE,
                          summary.in_bag, max_pixels=max_pixels)
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
            if item[0] != "copy":
                item = _frame(session, item, summary, recorded, spent, feed)
                progress.update(summary.frames_in)
                if item is None:  # dropped: no result for this frame
                    continue
                objects_seen.update(o.id for o in item[3].objects)
            t0 = clock()
            sink.put(item)
            spent["wait_output"] += clock() - t0
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
        if feed is not None:
            feed.close()
    progress.finish(summary.frames_in)
    spent["wall"] = clock() - wall0
    spent["cpu_total"] = time.process_time() - cpu0
    _fill_summary(summary, session, spent, Counter(source.spent) + Counter(sink.spent), objects_seen, sink)
    if feed is not None:
        summary.depth = session.depth_counts()
        summary.warnings += [f"depth input: {p}" for p in feed.problems]


def _frame(session: StreamSession, item, summary: BagSummary, recorded, spent, feed=None):
    """One image item through the session, with this frame's recorded prompt message (one per
    frame, as the node takes one request per frame): the sink's "result" item, or None when the
    frame is dropped (counted with its reason)."""
    _, conn, bag_ns, msg, rgb, error = item
    summary.frames_in += 1
    index = summary.frames_in - 1
    stamp_ns = stamp_ns_of(msg.header) if msg is not None else None
    if error is not None:
        when = f"stamp {format_stamp(stamp_ns)}" if stamp_ns is not None else "unknown stamp"
        session.drop(error[0], error[1], where=f"frame {index} at {when}")
        _example(summary, index, stamp_ns, error[1])
        return None
    taken = recorded.take(stamp_ns) if recorded is not None else None
    req = Request(f"prompt message stamped {format_stamp(taken[0])}", list(taken[1].prompts)) if taken else None
    step = session.step(rgb, stamp_ns, req, topic_index=index)
    spent["pipeline"] += step.pipeline_s
    summary.prompts_applied += step.entries_applied
    if req is not None:
        if step.request_back:
            recorded.put_back(taken)  # the node keeps a request for the next frame
        elif req.success:
            summary.prompts_applied += 1
        else:
            summary.prompts_refused += 1
            summary.refused_reasons.append(f"{req.source}: {req.message}")
    if step.result is None:
        _example(summary, index, stamp_ns, step.detail)
        return None
    session.times.add(step.result.timings)
    frame3d = None
    if feed is not None:
        t0 = time.perf_counter()
        feed.feed_until(step.stamp)
        frame3d = session.measure_3d(step.result)
        spent["depth3d"] += time.perf_counter() - t0
    return ("result", msg.header, rgb, step.result, step.frame_index, step.labels, bag_ns, frame3d)


def _example(summary: BagSummary, index: int, stamp_ns: Optional[int], message: str) -> None:
    if len(summary.dropped_examples) < 10:
        when = f"stamp {format_stamp(stamp_ns)}" if stamp_ns is not None else "unknown stamp"
        summary.dropped_examples.append(f"frame {index} at {when}: {message}")


def _fill_summary(summary: BagSummary, session: StreamSession, spent: Counter, busy: Counter,
                  objects_seen, sink) -> None:
    acc = session.account.snapshot()
    summary.results, summary.dropped, summary.resets = acc["results"], acc["dropped"], acc["resets"]
    summary.reset_reasons = list(session.account.reset_reasons)
    summary.seconds = {k: float(busy.get(k, spent.get(k, 0.0))) for k in TIMED_PARTS + ("wall",)}
    summary.seconds.update({k: float(spent[k]) for k in STALLS + ("cpu_total",)})
    summary.seconds.update({k: float(busy[k]) for k in ("cpu_input", "cpu_output")})
    summary.stage_ms = session.times.mean_ms_all()  # one add() per result
    summary.objects_seen = sorted(int(i) for i in objects_seen)
    summary.topics_written = dict(sink.written)
    for topic in sink.output_topics():
        summary.topics_written.setdefault(topic, 0)
