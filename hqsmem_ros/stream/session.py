"""One camera stream around HQSMemPipeline, the same for every driver (ROS-free).

The node (hqsmem_ros/ros/node.py), `hqsmem bag` (hqsmem_ros/bag.py) and `hqsmem track`
(hqsmem_ros/cli.py, a folder of frames without stamps) decode a frame, call StreamSession.step()
and encode what it returns; everything in between is owned here, once (HQSMemPipeline checks
only what its model step needs, and the tracker is the record of which objects exist):

- object ids (never reused in a run; a fresh id is the lowest id never used) and their labels;
- resets when stamps go back or the frame size changes (or, when told not to reset, the frame is
  dropped), decided only after the frame itself was found usable (a frame that is then refused
  changes nothing);
- the prompt schedule: the initial mask, a prompts file, and one Request per frame (a topic
  message, a service call or a recorded message), applied with its outcome on the Request;
- frame accounting (results + drops counted by reason, FrameAccount) and stage timings
  (StageTimes);
- with depth (a core.depth3d.Depth3D given as `depth`), each result's 3D: `measure_3d(result)`
  pairs it with a depth frame and counts the outcome per reason (Depth3D.counts, read through
  `depth_counts()`): a frame without 3D still has its 2D result, and is counted.

Not thread-safe by itself: one thread steps a session; precheck() and the counters may be read
from others (the node's service threads).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

from ..core.depth3d import Depth3D, Frame3D
from ..core.pipeline import FrameError, FrameResult, HQSMemPipeline, ObjectPrompt, PromptError, check_image
from ..io import prompt_msgs
from ..io.prompt_msgs import MAX_ID
from ..io.prompts_file import PromptEntry, PromptSchedule, PromptsFileError, format_stamp
from .accounting import FrameAccount, StageTimes

Log = Callable[[str, str], None]  # (level: info | warning | error, text)


@dataclass
class Request:
    """Prompts and/or removals to apply on the next usable frame.

    prompts: hqsmem_ros/ObjectPrompt messages (rclpy or rosbags; any object with their fields).
    The outcome is written here: success, message, ids (the ids given to the prompts), and
    `done` is set, except when the frame was dropped: then the driver offers it again.
    """
    source: str
    prompts: List[Any] = field(default_factory=list)
    remove: List[int] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    taken: bool = False  # a frame is being processed with it (the node's service wait)
    success: bool = False
    message: str = ""
    ids: List[int] = field(default_factory=list)


@dataclass
class Step:
    """What one frame gave: a result, or a drop with its reason."""
    stamp: float
    result: Optional[FrameResult] = None
    frame_index: int = -1  # index of this result among the session's results
    labels: Dict[int, str] = field(default_factory=dict)  # object id -> label, for the output
    drop_reason: Optional[str] = None
    detail: str = ""  # why it was dropped
    request_back: bool = False  # the request was not used (frame dropped): offer it again
    entries_applied: int = 0  # prompts-file entries applied on this frame
    pipeline_s: float = 0.0  # time spent in HQSMemPipeline.process
    pipeline_cpu_s: float = 0.0  # the same as CPU time of the calling thread


def stamp_from_ns(stamp_ns: int) -> float:
    """Seconds, computed as the node always did (sec + nanosec * 1e-9)."""
    sec, nsec = divmod(int(stamp_ns), 1_000_000_000)
    return sec + nsec * 1e-9


class StreamSession:
    """Ids, resets, the prompt schedule, accounting and timings of one stream (module docstring).

    schedule_errors: "skip" (the node: a bad prompts-file entry is logged and skipped) or
    "raise" (`hqsmem bag`: PromptsFileError naming the entries, the run stops).
    reset_on_stamp_back: bool or a callable read on every frame; when false, a frame stamped
    before the previous one is dropped ("stamp_backwards") instead of resetting the tracker.
    reset_on_size_change: when false, a frame of another size than the previous one is dropped
    ("size_changed": `hqsmem track`, where one sequence has one size) instead of resetting.
    """

    def __init__(self, pipeline: HQSMemPipeline, *, schedule: Optional[PromptSchedule] = None,
                 schedule_errors: str = "skip", initial_labels: Optional[np.ndarray] = None,
                 reset_on_stamp_back: Union[bool, Callable[[], bool]] = True,
                 reset_on_size_change: bool = True, log: Optional[Log] = None,
                 depth: Optional[Depth3D] = None):
        if schedule_errors not in ("skip", "raise"):
            raise ValueError(f"schedule_errors must be 'skip' or 'raise', got {schedule_errors!r}")
        self.pipeline = pipeline
        self.schedule = schedule
        self._strict = schedule_errors == "raise"
        self._initial_labels = initial_labels
        self._seed_pending = initial_labels is not None
        self._reset_on_stamp_back = (reset_on_stamp_back if callable(reset_on_stamp_back)
                                     else (lambda: bool(reset_on_stamp_back)))
        self._reset_on_size_change = bool(reset_on_size_change)
        self._log: Log = log or (lambda level, text: None)
        self.account = FrameAccount()
        self.times = StageTimes()
        self.used_ids: Set[int] = set()  # every id given to an object in this run
        self.live_ids: Tuple[int, ...] = ()  # the tracked objects (a snapshot other threads read)
        self.labels: Dict[int, str] = {}
        self.frame_index = 0  # the next result's index
        self.last_stamp: Optional[float] = None
        self.frame_shape: Optional[Tuple[int, int]] = None
        self._low_id = 1  # no id below this is free (ids are never reused, so it only grows)
        self.depth = depth

    # -- 3D -----------------------------------------------------------------------------------
    def measure_3d(self, result: FrameResult, want_points: bool = False) -> Optional[Frame3D]:
        """The result's objects in 3D (None without depth). A frame without usable depth gets a
        Frame3D with its reason, counted in depth_counts() as no_3d.<reason>.

        Depth frames are not forgotten on a tracker reset: the pairer empties itself when depth
        stamps go back, and older depth frames only ever pair with colour frames near them."""
        if self.depth is None:
            return None
        return self.depth.process(result, want_points)

    def depth_counts(self) -> Dict[str, int]:
        """3D outcomes per result and depth message counts ({} without depth)."""
        if self.depth is None:
            return {}
        return {**self.depth.counts, **{f"pairing.{k}": v for k, v in self.depth.pairer.counts.items()}}

    # -- ids ----------------------------------------------------------------------------------
    def fresh_id(self, reserved: Sequence[int] = ()) -> int:
        """The lowest id never used in this run, outside `reserved` (ids about to be given)."""
        taken = self.used_ids.union(self.live_ids)
        while self._low_id in taken:
            self._low_id += 1
        oid, reserved = self._low_id, set(reserved)
        while oid in reserved or oid in taken:
            oid += 1
        if oid > MAX_ID:
            raise PromptError(f"all {MAX_ID} object ids of this run are used; restart to start over")
        return oid

    def precheck(self, req: Request) -> Optional[str]:
        """What is wrong with a request before any frame (ids, duplicates, encodings, removals)."""
        live = set(self.live_ids)
        reason = prompt_msgs.problem_without_frame(req.prompts, self.used_ids, live)
        if reason:
            return reason
        seen = set()
        for oid in req.remove:
            if oid in seen:
                return f"id {oid} appears twice"
            seen.add(oid)
            if oid not in live:
                return f"cannot remove id {oid}: not tracked (tracked: {sorted(live)})"
        return None

    def refuse(self, req: Request, reason: str) -> None:
        """The request is not applied: say why, count it, and wake whoever waits for it."""
        req.success, req.message = False, reason
        self.account.refused(req.source)
        self._log("error", f"{req.source}: refused: {reason}")
        req.done.set()

    def reset(self, why: str) -> List[int]:
        """Forget every object and the memory; their ids stay used. Returns the retired ids."""
        cleared = list(self.pipeline.object_ids)
        self.used_ids.update(cleared)
        self.pipeline.reset()
        self.live_ids = ()
        self.frame_shape = None
        self.last_stamp = None
        self.labels.clear()
        self._seed_pending = self._initial_labels is not None
        self.account.reset(why)
        self._log("warning", f"tracker reset: {why}; retired ids {cleared}"
                  + ("; initial_mask seeds again on the next frame" if self._seed_pending else ""))
        return cleared

    def drop(self, reason: str, detail: str, stamp: Optional[float] = None,
             request: Optional[Request] = None, where: Optional[str] = None) -> Step:
        """Count a frame that gets no result (undecodable, refused, ...); `where` names it in
        the log line (e.g. "frame 6 at stamp ...")."""
        self.account.drop(reason)
        if where is not None:
            self._log("error", f"dropped {where}: {detail}")
        else:
            self._log("error", (f"frame at {stamp:.6f}" if stamp is not None else "frame") + f" dropped: {detail}")
        return Step(stamp if stamp is not None else float("nan"), drop_reason=reason, detail=detail,
                    request_back=request is not None)

    # -- one frame ----------------------------------------------------------------------------
    def step(self, rgb: np.ndarray, stamp_ns: Optional[int], request: Optional[Request] = None,
             topic_index: Optional[int] = None) -> Step:
        """Apply what is due and track one frame (RGB HxWx3 uint8, header stamp in ns).

        stamp_ns None: frames without stamps (a folder of images): nothing can go back, and the
        memory schedule counts frames. topic_index: the frame's index on its topic, for
        prompts-file `frame:` entries and messages (`hqsmem bag`); None = the index among this
        session's results (the node).
        """
        stamp = None if stamp_ns is None else stamp_from_ns(stamp_ns)
        index = self.frame_index if topic_index is None else topic_index
        where = None if topic_index is None else (
            f"frame {index}" + (f" at stamp {format_stamp(stamp_ns)}" if stamp_ns is not None else ""))
        try:  # the frame must be usable before it may reset anything
            check_image(rgb)  # (the pipeline makes it contiguous: its own time)
        except FrameError as exc:
            return self.drop("bad_frame", str(exc), stamp, request, where)
        if self.last_stamp is not None and stamp is not None and stamp < self.last_stamp:
            if not self._reset_on_stamp_back():
                return self.drop("stamp_backwards", f"stamp older than the previous frame's "
                                 f"{self.last_stamp:.6f}", stamp, request, where)
            self.reset(f"image stamps went back from {self.last_stamp:.6f} to {stamp:.6f} at frame "
                       f"{index} (looping bag?)")
        shape = rgb.shape[:2]
        if self.frame_shape is not None and shape != self.frame_shape:
            h0, w0 = self.frame_shape
            change = f"image size changed from {w0}x{h0} to {shape[1]}x{shape[0]} at frame {index}"
            if not self._reset_on_size_change:
                return self.drop("size_changed", change, stamp, request, where)
            self.reset(change)

        seeds = self._seed_prompts(shape)
        due, file_prompts, file_remove, file_labels = self._file_prompts(index, stamp_ns, shape)
        scheduled = seeds + file_prompts
        extra: List[ObjectPrompt] = []
        req_labels: Dict[int, str] = {}
        if request is not None:
            reason = self.precheck(request)
            try:
                if reason:
                    raise PromptError(reason)
                extra, req_labels = self._request_prompts(request, shape, scheduled)
            except PromptError as exc:
                self.refuse(request, str(exc))
                request = None
        t0, cpu0 = time.perf_counter(), time.thread_time()
        result, prompts, remove, request = self._run_pipeline(
            rgb, stamp, scheduled, extra, file_remove, request, (due, index, stamp_ns))
        spent = (time.perf_counter() - t0, time.thread_time() - cpu0)
        return self._commit(result, stamp, prompts, remove, request, req_labels, seeds,
                            (due, file_prompts, file_labels), spent)

    def _run_pipeline(self, rgb, stamp, scheduled, extra, file_remove, request, where):
        """The pipeline on this frame; a refused request must not cost the frame nor what was
        scheduled: retry without what was refused."""
        attempts = []
        if request is not None:
            attempts.append((scheduled + extra, list(request.remove) + file_remove, request))
        if scheduled or file_remove:
            attempts.append((scheduled, file_remove, None))
        attempts.append(([], [], None))
        for prompts, remove, with_req in attempts:
            try:
                return self.pipeline.process(rgb, stamp, prompts=prompts, remove=remove), prompts, remove, with_req
            except PromptError as exc:
                if with_req is not None:
                    self.refuse(with_req, str(exc))
                elif self._strict and where[0]:
                    raise PromptsFileError(_entries_error(where[0], where[1], where[2], exc)) from exc
                else:
                    self._log("error", f"initial_mask / prompts_file not used: {exc}")
        raise AssertionError("unreachable: the last attempt has no prompts")

    def _commit(self, result, stamp, prompts, remove, request, req_labels, seeds, file_part,
                spent) -> Step:
        due, file_prompts, file_labels = file_part
        applied = {p.id for p in prompts}
        self.frame_shape = result.shape
        self.last_stamp = stamp
        self.live_ids = tuple(self.pipeline.object_ids)
        self.used_ids.update(applied)
        if seeds and applied & {p.id for p in seeds}:
            self._log("info", f"initial_mask seeded objects {[p.id for p in seeds]}")
        if request is not None:
            self.labels.update(req_labels)
        if due:
            self.schedule.mark_applied(due)
            self.labels.update({i: t for i, t in file_labels.items() if i in applied})
            started = sorted(applied & {p.id for p in file_prompts})
            if started or remove:
                self._log("info", f"prompts_file: started {started}, removed {sorted(remove)} on frame "
                                  f"{self.frame_index}")
        for oid in remove:
            self.labels.pop(oid, None)
        if request is not None:
            what = []
            if request.ids:
                what.append(f"objects {request.ids} started")
            if request.remove:
                what.append(f"objects {request.remove} removed (ids retired)")
            request.success = True
            request.message = (f"{' and '.join(what)} on frame {self.frame_index}"
                               + (f" (stamp {stamp:.6f})" if stamp is not None else ""))
            self._log("info", f"{request.source}: {request.message}")
            request.done.set()
        step = Step(stamp if stamp is not None else float("nan"), result, self.frame_index, dict(self.labels), entries_applied=len(due),
                    pipeline_s=spent[0], pipeline_cpu_s=spent[1])
        self.frame_index += 1
        self.account.result()
        return step

    # -- what is due --------------------------------------------------------------------------
    def _seed_prompts(self, shape) -> List[ObjectPrompt]:
        """The initial mask's objects, on the first frame after start or a reset."""
        if not self._seed_pending:
            return []
        self._seed_pending = False
        labels = self._initial_labels
        if labels.shape != tuple(shape):
            self._log("error", f"initial_mask not used: initial_mask is {labels.shape[1]}x{labels.shape[0]} "
                               f"but the camera image is {shape[1]}x{shape[0]}")
            return []
        values = [int(v) for v in np.unique(labels) if v]
        prompts: List[ObjectPrompt] = []
        for value in values:
            oid = value if value not in self.used_ids else self.fresh_id(values + [p.id for p in prompts])
            prompts.append(ObjectPrompt(id=oid, mask=labels == value))
        return prompts

    def _file_prompts(self, index: int, stamp_ns: int, shape):
        """Entries of the prompts file due on this frame: (entries, prompts, removals, labels)."""
        if self.schedule is None:
            return [], [], [], {}
        due: List[PromptEntry] = self.schedule.due(index, stamp_ns)
        if not due:
            return [], [], [], {}
        try:
            prompts, remove, labels = self.schedule.prompts_for(due, shape)
        except PromptsFileError as exc:
            if self._strict:
                raise
            self.schedule.mark_applied(due)  # a bad entry is reported once, not retried forever
            self._log("error", f"prompts_file entry not used: {exc}")
            return [], [], [], {}
        live = set(self.live_ids)
        reused = sorted(p.id for p in prompts if p.id in self.used_ids and p.id not in live)
        if reused and self._strict:
            exc = PromptError(f"id {reused[0]} was used before by an object that was removed or cleared "
                              "by a tracker reset; ids are never reused")
            raise PromptsFileError(_entries_error(due, index, stamp_ns, exc))
        if reused:
            self._log("error", f"prompts_file: ids {reused} were used before and are never reused; skipped")
            prompts = [p for p in prompts if p.id not in reused]
        if not self._strict:
            remove = [i for i in remove if i in live]
        return due, prompts, remove, labels

    def _request_prompts(self, req: Request, shape, pending: Sequence[ObjectPrompt]):
        """ObjectPrompt messages -> pipeline prompts; fresh ids for id 0."""
        out: List[ObjectPrompt] = []
        labels: Dict[int, str] = {}
        explicit = [int(p.id) for p in req.prompts if int(p.id)]
        for k, p in enumerate(req.prompts):
            oid = int(p.id) or self.fresh_id(explicit + [q.id for q in list(pending) + out])
            mask = None
            if p.mask.width > 0 and p.mask.height > 0:
                mask = prompt_msgs.prompt_mask(p.mask, oid, shape, f"prompt {k}")
            box = prompt_msgs.prompt_box(p, shape, f"prompt {k}")
            out.append(ObjectPrompt(id=oid, mask=mask, box=box, points=prompt_msgs.click_points(p)))
            if p.label:
                labels[oid] = str(p.label)
        req.ids = [q.id for q in out]
        return out, labels


def _entries_error(entries: Sequence[PromptEntry], index: int, stamp_ns: int, exc: Exception) -> str:
    names = "; ".join(e.source for e in entries)
    when = f"frame {index}" + (f" (stamp {format_stamp(stamp_ns)})" if stamp_ns is not None else "")
    return f"{names}: cannot apply on {when}: {exc}"
