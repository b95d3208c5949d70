"""The HQ-SMem per-frame loop (paper Sec. 3, ../shared/notes/algorithm.md), ROS-free.

For frame t and every tracked object i:
  1. y_t = base tracker (memory + prior y_{t-1}^HQ)                       (Eq. 1, 10)
  2. three proposals from the refiner, prompted with the box of y_{t,i}
  3. p = argmax_c cos(phi(s^c), phi(y)); accept if cos > tau_verify       (Eq. 8-9)
  4. teacher forcing: the accepted mask is what the tracker commits        (Eq. 10)
  5. on candidate frames, smart memory decides what long-term memory keeps (Eq. 3-7)
The paper's ablation rows are switches of the config (refine off/always/gated, teacher forcing,
smart memory); see config.ABLATIONS.

Smart-memory embedding of a frame with several objects: the mean of the objects' unit
embeddings (phi under each committed mask). It has a fixed size whatever the number of objects,
so entries stay comparable when objects are added or removed mid-stream; the price is that a
change of one object among N moves z_t by about 1/N.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from . import registry
from .config import ConfigError, PipelineConfig, load_config
from .gating import select_proposals
from .interfaces import BaseTracker, FeatureExtractor, Masks, Refiner
from .masks import mask_box
from .smart_memory import SmartMemory


class PromptError(ValueError):
    """A prompt or removal request that cannot be applied (the message says why)."""


class FrameError(ValueError):
    """A frame that cannot be processed (not an HxWx3 uint8 RGB array of at least 8x8, or a
    stamp that is not a finite number)."""


@dataclass
class ObjectPrompt:
    """Start or correct object `id` on this frame from a mask (preferred), a box, clicks, or a
    box with clicks. Clicks need a refiner that takes them (Refiner.accepts_points)."""
    id: int
    mask: Optional[np.ndarray] = None  # bool HxW at the input frame's size
    box: Optional[Sequence[float]] = None  # (x0, y0, x1, y1) in input pixels, x1/y1 exclusive
    points: Optional[Sequence[Tuple[float, float, int]]] = None  # (x, y, 1 on the object | 0 background)


@dataclass
class TrackedObject:
    id: int
    box: Tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), input pixels; zeros if absent
    score: float  # verification cosine when the refiner was consulted, else 1 (visible) / 0
    visible: bool
    refined: bool  # the output mask is the refiner's (accepted) proposal
    area: int
    centroid: Tuple[float, float]  # x, y in input pixels; (nan, nan) if absent


@dataclass
class FrameResult:
    frame: int
    stamp: Optional[float]
    shape: Tuple[int, int]
    objects: List[TrackedObject]
    timings: Dict[str, float]
    memory_frames: List[int]
    label: np.ndarray = field(repr=False, default=None)  # uint16 HxW: pixel = object id

    def label_map(self) -> np.ndarray:
        """uint16 HxW: pixel = object id, 0 = background."""
        return self.label

    @property
    def masks(self) -> Dict[int, np.ndarray]:
        """Disjoint bool masks at the input size, one per object (all False if absent), computed
        from the label image when asked for (the drivers need only the label image)."""
        return {o.id: self.label == o.id for o in self.objects}


def check_image(image) -> None:
    """FrameError unless the frame is one the pipeline takes (HxWx3 uint8, at least 8x8)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
        raise FrameError(f"frame must be an HxWx3 uint8 RGB array, got {desc}")
    if image.shape[0] < 8 or image.shape[1] < 8:
        raise FrameError(f"frame of {image.shape[1]}x{image.shape[0]} is too small (at least 8x8)")


def _resize_mask(mask: np.ndarray, size_wh: Tuple[int, int]) -> np.ndarray:
    if mask.shape[1] == size_wh[0] and mask.shape[0] == size_wh[1]:
        return mask
    up = cv2.resize(mask.astype(np.uint8) * 255, size_wh, interpolation=cv2.INTER_LINEAR)
    return up > 127


def check_device(device: str) -> None:
    """Refuse at start a CUDA device this machine does not have (the one device check: the
    node, `hqsmem track`/`bag`/`bench` all build the pipeline), never silently the CPU. 'cpu'
    and 'auto' need no check (and no torch: the weight-free pipeline runs without it)."""
    if not str(device).startswith("cuda"):
        return
    try:
        from hqsmem_ros.models.checkpoints import resolve_device
    except ImportError as exc:
        raise ConfigError(f"device {device!r} needs PyTorch with CUDA, which is not importable here "
                          f"({exc}); use device 'cpu' or 'auto'") from exc
    resolve_device(device)  # DeviceError (a ConfigError) naming what this machine has


class HQSMemPipeline:
    """Runs HQ-SMem frame by frame on a stream; one instance per camera.

    What it checks is the model step's contract: an RGB uint8 frame of at least 8x8, prompts
    whose masks / boxes / clicks fit the frame they come with, ids a label image can hold, the
    tracker's capacity. Which objects exist is the tracker's (BaseTracker.object_ids). A stream's
    history is not: ids never reused, stamps going back and frame size changes belong to
    hqsmem_ros.stream.StreamSession, which every stream driver goes through. Here every frame is
    scaled to the working size its first frame after reset() fixed.
    """

    def __init__(self, config=None, tracker: Optional[BaseTracker] = None,
                 refiner: Optional[Refiner] = None, features: Optional[FeatureExtractor] = None):
        self.config: PipelineConfig = load_config(config)
        c = self.config
        check_device(c.device)
        self.tracker = tracker or registry.build("tracker", c.tracker, c.device, c.precision)
        self.refiner = refiner or registry.build("refiner", c.refiner, c.device, c.precision)
        self.features = features or registry.build("features", c.features, c.device, c.precision)
        self.memory = SmartMemory(c.memory_capacity, c.memory_lambda, c.tau_memory) if c.use_smart_memory else None
        self.tracker.set_memory_policy(self.memory is not None, c.memory_capacity)
        self.reset()

    # -- state --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every object, the memory, the working size and the memory schedule."""
        self.tracker.reset()
        if self.memory is not None:
            self.memory.clear()
        self._frame = 0
        self._work_wh: Optional[Tuple[int, int]] = None  # (W, H) the models see, set by the first frame
        self._prompt_frame_of: Dict[int, int] = {}  # object id -> its latest prompt frame
        self._last_candidate_frame: Optional[int] = None
        self._last_candidate_stamp: Optional[float] = None

    # Keys the loop reads afresh on every frame: safe to change between two frames.
    RUNTIME_KEYS = frozenset({"refine", "teacher_forcing", "tau_verify", "tau_memory", "memory_lambda",
                              "memory_interval", "memory_interval_s", "min_refine_area", "sequence_length"})

    def update_config(self, config) -> None:
        """Apply a new config between two frames; only RUNTIME_KEYS may differ.

        Models, device, memory capacity and processing size are fixed for a pipeline's life:
        changing them needs a new pipeline.
        """
        new = load_config(config)
        old, fresh = self.config.to_dict(), new.to_dict()
        fixed = sorted(k for k in old if old[k] != fresh[k] and k not in self.RUNTIME_KEYS)
        if fixed:
            raise ConfigError(f"cannot change {', '.join(fixed)} while running; only "
                              f"{', '.join(sorted(self.RUNTIME_KEYS))} can change")
        if new.use_smart_memory != self.config.use_smart_memory:
            raise ConfigError("cannot switch smart memory on or off while running")
        self.config = new
        if self.memory is not None:
            self.memory.lam = float(new.memory_lambda)
            self.memory.tau = float(new.tau_memory)

    @property
    def object_ids(self) -> List[int]:
        """The tracked objects: the tracker's, the one record of which objects exist."""
        return sorted(self.tracker.object_ids)

    @property
    def frames_processed(self) -> int:
        return self._frame

    def stats(self) -> Dict[str, object]:
        return {
            "frames": self._frame,
            "objects": len(self.tracker.object_ids),
            "memory_size": len(self.tracker.memory_frames()),
            "memory_capacity": self.config.memory_capacity if self.memory is not None else None,
            "memory_frames": self.tracker.memory_frames(),
            "memory_bytes": self.tracker.memory_bytes(),
            "pinned_frames": self.memory.pinned_frames if self.memory is not None else [],
            "tracker": self.tracker.name,
            "refiner": self.refiner.name,
            "features": self.features.name,
            "ablation": self.config.ablation,
            "refine_mode": self.config.refine_mode,
            "teacher_forcing": self.config.use_teacher_forcing,
            "smart_memory": self.config.use_smart_memory,
        }

    # -- input checks -------------------------------------------------------------------------
    def _check_requests(self, prompts: Sequence[ObjectPrompt], remove: Sequence[int], shape) -> None:
        h, w = shape
        seen = set()
        tracked = set(self.tracker.object_ids)
        for oid in remove:
            if oid not in tracked:
                raise PromptError(f"cannot remove object {oid}: not tracked (tracked: {sorted(tracked)})")
        new = 0
        for p in prompts:
            if isinstance(p.id, bool) or not isinstance(p.id, (int, np.integer)) or p.id <= 0 or p.id > 65535:
                raise PromptError(f"object id must be an integer in 1..65535, got {p.id!r}")
            if p.id in seen:
                raise PromptError(f"object id {p.id} appears twice in one request")
            seen.add(p.id)
            if p.id in remove:
                raise PromptError(f"object id {p.id} is both prompted and removed")
            if p.id not in tracked:
                new += 1
            if p.mask is not None:
                m = np.asarray(p.mask)
                if m.shape != (h, w):
                    raise PromptError(f"mask for object {p.id} is {m.shape[1] if m.ndim > 1 else '?'}x{m.shape[0]}, frame is {w}x{h}")
                if not m.any():
                    raise PromptError(f"mask for object {p.id} is empty")
                continue  # a mask says everything: a box or points beside it are not needed
            if p.box is not None:
                b = np.asarray(p.box, dtype=np.float64).reshape(-1)
                if b.size != 4 or not np.all(np.isfinite(b)):
                    raise PromptError(f"box for object {p.id} must be 4 finite numbers (x0, y0, x1, y1), got {p.box!r}")
                x0, y0, x1, y1 = np.clip(b, 0, [w, h, w, h])
                if x1 - x0 < 2 or y1 - y0 < 2:
                    raise PromptError(f"box {tuple(b)} for object {p.id} is empty or outside the {w}x{h} frame")
            if p.points is not None:
                self._check_points(p, (h, w))
            elif p.box is None:
                raise PromptError(f"prompt for object {p.id} has neither a mask, a box nor points")
        if len(tracked) - len(set(remove)) + new > self.tracker.max_objects:
            raise PromptError(f"tracker {self.tracker.name!r} can track at most {self.tracker.max_objects} objects")

    # -- the loop -----------------------------------------------------------------------------
    def process(self, image: np.ndarray, stamp: Optional[float] = None,
                prompts: Optional[Sequence[ObjectPrompt]] = None,
                remove: Optional[Iterable[int]] = None) -> FrameResult:
        """Track one frame. Prompts and removals take effect on this frame.

        Raises FrameError / PromptError before changing any state, so a caller can log the
        error and go on with the next frame (or this frame without the bad request).
        """
        t_start = time.perf_counter()
        check_image(image)
        image = np.ascontiguousarray(image)
        if stamp is not None and not np.isfinite(stamp):
            raise FrameError(f"stamp must be finite, got {stamp!r}")
        prompts = list(prompts or [])
        remove = [int(i) for i in (remove or [])]
        H, W = image.shape[:2]
        self._check_requests(prompts, remove, (H, W))
        if self._work_wh is None:
            s = min(1.0, (self.config.process_max_side or max(H, W)) / max(H, W))
            self._work_wh = (max(8, int(round(W * s))), max(8, int(round(H * s))))
        t = self._frame
        timings: Dict[str, float] = {}

        clock = time.perf_counter()
        small = image if self._work_wh == (W, H) else cv2.resize(image, self._work_wh, interpolation=cv2.INTER_AREA)
        timings["resize"] = time.perf_counter() - clock

        clock = time.perf_counter()
        tracked = self.tracker.track(t, small) if self.tracker.object_ids else {}
        timings["track"] = time.perf_counter() - clock

        clock = time.perf_counter()
        prompt_masks, refiner_ready = self._apply_requests(t, small, tracked, prompts, remove, (H, W))
        timings["prompt"] = time.perf_counter() - clock

        coarse: Masks = {**tracked, **prompt_masks}
        final, refined, score, features_ready = self._refine(small, tracked, coarse, prompt_masks,
                                                             refiner_ready, timings)

        clock = time.perf_counter()
        committed = final if self.config.use_teacher_forcing else coarse
        self.tracker.commit(t, small, committed)
        self._update_memory(t, stamp, small, committed, bool(prompt_masks), features_ready)
        timings["memory"] = time.perf_counter() - clock

        clock = time.perf_counter()
        result = self._build_result(t, stamp, final, refined, score, (H, W))
        timings["output"] = time.perf_counter() - clock
        timings["total"] = time.perf_counter() - t_start
        result.timings = timings
        self._frame += 1
        return result

    def _apply_requests(self, t: int, small: np.ndarray, tracked: Masks, prompts: Sequence[ObjectPrompt],
                        remove: Sequence[int], shape) -> Tuple[Masks, bool]:
        """Removals, then the prompts' masks at the working size, handed to the tracker.
        Returns (prompt masks, whether the refiner already has this frame's image)."""
        H, W = shape
        refiner_ready = False
        if remove:
            self.tracker.remove_objects(remove)
            for oid in remove:
                tracked.pop(oid, None)
                self._release_prompt_frame(oid)
        prompt_masks: Masks = {}
        box_prompts = [p for p in prompts if p.mask is None and p.points is None]
        point_prompts = [p for p in prompts if p.mask is None and p.points is not None]
        if box_prompts or point_prompts:
            self.refiner.set_image(small)
            refiner_ready = True
        if point_prompts:
            prompt_masks.update(self._point_prompt_masks(point_prompts, (H, W)))
        if box_prompts:
            boxes = np.array([self._to_work_box(p.box, (H, W)) for p in box_prompts])
            props, scores = self.refiner.propose(boxes)
            for k, p in enumerate(box_prompts):
                m = props[k, int(np.argmax(scores[k]))]
                if not m.any():  # nothing segmented: the box itself (state already moved on)
                    x0, y0, x1, y1 = (int(round(v)) for v in boxes[k])
                    m = np.zeros(small.shape[:2], bool)
                    m[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = True
                prompt_masks[p.id] = m
        for p in prompts:
            if p.mask is not None:
                m = cv2.resize(np.asarray(p.mask, dtype=np.uint8), self._work_wh, interpolation=cv2.INTER_AREA) > 0 \
                    if self._work_wh != (W, H) else np.asarray(p.mask, dtype=bool)
                prompt_masks[p.id] = m
        if prompt_masks:
            self.tracker.add_objects(t, small, prompt_masks)
            for oid in prompt_masks:
                self._release_prompt_frame(oid)
                self._prompt_frame_of[oid] = t
        return prompt_masks, refiner_ready

    def _refine(self, small: np.ndarray, tracked: Masks, coarse: Masks, prompt_masks: Masks,
                refiner_ready: bool, timings: Dict[str, float]):
        """Steps 2-3: proposals for the tracked objects and the verification gate.
        Returns (final masks, refined flags, gate scores, whether the features saw this frame)."""
        final: Masks = dict(coarse)
        refined: Dict[int, bool] = {}
        score: Dict[int, float] = {}
        mode = self.config.refine_mode
        # A prompt is the user's word for this frame: its mask is the output and what the tracker
        # commits, never refined (also for an object that is re-prompted while tracked).
        to_refine = [i for i in sorted(tracked) if i not in prompt_masks
                     and tracked[i].sum() >= max(1, self.config.min_refine_area)]
        clock = time.perf_counter()
        features_ready = False
        if mode != "off" and to_refine:
            if not refiner_ready:
                self.refiner.set_image(small)
            boxes = np.array([mask_box(coarse[i]) for i in to_refine], dtype=np.float64)
            if self.refiner.accepts_mask_hint:
                props, pscores = self.refiner.propose(boxes, masks=np.stack([coarse[i] for i in to_refine]))
            else:
                props, pscores = self.refiner.propose(boxes)
            timings["refine"] = time.perf_counter() - clock
            clock = time.perf_counter()
            if mode == "always":
                for k, oid in enumerate(to_refine):
                    final[oid] = props[k, int(np.argmax(pscores[k]))]
                    refined[oid] = True
            else:
                self.features.set_image(small)
                features_ready = True
                n, c = props.shape[:2]
                stack = np.concatenate([np.stack([coarse[i] for i in to_refine]), props.reshape(n * c, *props.shape[2:])])
                emb = self.features.embed(stack)
                chosen, accept, cos = select_proposals(emb[:n], emb[n:].reshape(n, c, -1), self.config.tau_verify)
                for k, oid in enumerate(to_refine):
                    score[oid] = float(cos[k])
                    if accept[k]:
                        final[oid] = props[k, chosen[k]]
                        refined[oid] = True
            timings["verify"] = time.perf_counter() - clock
        else:
            timings["refine"] = timings["verify"] = 0.0
        return final, refined, score, features_ready

    def _check_points(self, p: ObjectPrompt, shape) -> None:
        h, w = shape
        try:
            pts = np.asarray(p.points, dtype=np.float64).reshape(-1, 3)
        except (TypeError, ValueError):
            raise PromptError(f"points for object {p.id} must be (x, y, label) triples, got {p.points!r}") from None
        if len(pts) == 0:
            raise PromptError(f"points for object {p.id}: the list is empty")
        if not np.all(np.isfinite(pts)):
            raise PromptError(f"points for object {p.id} must be finite, got {pts.tolist()}")
        bad_label = [lbl for lbl in pts[:, 2] if lbl not in (0, 1)]
        if bad_label:
            raise PromptError(f"points for object {p.id}: label must be 1 (on the object) or 0 "
                              f"(background), got {bad_label[0]:g}")
        outside = [(x, y) for x, y in pts[:, :2] if not (0 <= x < w and 0 <= y < h)]
        if outside:
            raise PromptError(f"point ({outside[0][0]:g}, {outside[0][1]:g}) for object {p.id} is outside "
                              f"the {w}x{h} frame")
        if p.box is None and not (pts[:, 2] == 1).any():
            raise PromptError(f"points for object {p.id}: without a box, at least one point must be on "
                              "the object (label 1)")
        if not self.refiner.accepts_points:
            raise PromptError(f"refiner {self.refiner.name!r} does not take point prompts; give a box or "
                              "a mask (or use a refiner that takes clicks: watershed, sam_hq)")

    def _point_prompt_masks(self, prompts: Sequence[ObjectPrompt], shape) -> Masks:
        """Masks at the working size for click prompts (with or without a box), one batched call."""
        H, W = shape
        sx, sy = self._work_wh[0] / W, self._work_wh[1] / H
        points, labels = [], []
        for p in prompts:
            pts = np.asarray(p.points, dtype=np.float64).reshape(-1, 3)
            points.append(pts[:, :2] * [sx, sy])
            labels.append(pts[:, 2].astype(np.int32))
        boxes = np.array([self._to_work_box(p.box, (H, W)) if p.box is not None else (np.nan,) * 4
                          for p in prompts], dtype=np.float64)
        props, scores = self.refiner.propose_points(points, labels, boxes)
        out: Masks = {}
        hw = (self._work_wh[1], self._work_wh[0])
        for k, p in enumerate(prompts):
            m = _best_for_clicks(props[k], scores[k], points[k], labels[k])
            if not m.any():  # nothing segmented: the box, else small discs at the clicks
                m = np.zeros(hw, np.uint8)
                if p.box is not None:
                    x0, y0, x1, y1 = (int(round(v)) for v in boxes[k])
                    m[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = 1
                else:
                    for (x, y), lbl in zip(points[k], labels[k]):
                        if lbl == 1:
                            cv2.circle(m, (int(x), int(y)), 2, 1, -1)
                m = m > 0
            out[p.id] = m
        return out

    def _to_work_box(self, box, shape) -> Tuple[float, float, float, float]:
        h, w = shape
        x0, y0, x1, y1 = np.clip(np.asarray(box, dtype=np.float64), 0, [w, h, w, h])
        sx, sy = self._work_wh[0] / w, self._work_wh[1] / h
        return x0 * sx, y0 * sy, x1 * sx, y1 * sy

    # -- memory policy ------------------------------------------------------------------------
    def _is_candidate(self, t: int, stamp: Optional[float]) -> bool:
        c = self.config
        if c.memory_interval_s is not None and stamp is not None:
            due = self._last_candidate_stamp is None or stamp - self._last_candidate_stamp >= c.memory_interval_s
        else:
            due = self._last_candidate_frame is None or t - self._last_candidate_frame >= c.candidate_interval()
        if due:
            self._last_candidate_frame, self._last_candidate_stamp = t, stamp
        return due

    def _update_memory(self, t, stamp, small, committed: Masks, prompt_frame: bool, features_ready: bool) -> None:
        candidate = self._is_candidate(t, stamp)
        if not (candidate or prompt_frame):
            return
        if self.memory is None:  # the base tracker's own rule: every candidate frame is appended
            self.tracker.store_memory(t)
            return
        visible = [m for m in committed.values() if m.any()]
        if not visible:
            return  # nothing to remember: an empty frame would only dilute the memory
        if not features_ready:
            self.features.set_image(small)
        emb = self.features.embed(np.stack(visible))
        z = emb.mean(axis=0)
        if prompt_frame:
            while len(self.memory) >= self.memory.capacity and len(self.memory.pinned_frames) >= self.memory.capacity:
                self.memory.unpin(self.memory.pinned_frames[0])  # too many prompt frames: oldest becomes evictable
            removed = self.memory.add(t, z, pinned=True)
        else:
            removed = self.memory.update(t, z)
        if removed is not None and removed != t:
            self.tracker.drop_memory(removed)
        if t in self.memory:
            self.tracker.store_memory(t)

    def _release_prompt_frame(self, oid: int) -> None:
        frame = self._prompt_frame_of.pop(oid, None)
        if frame is not None and self.memory is not None and frame not in self._prompt_frame_of.values():
            self.memory.unpin(frame)

    # -- output -------------------------------------------------------------------------------
    def _build_result(self, t, stamp, final: Masks, refined, score, shape) -> FrameResult:
        H, W = shape
        full = {oid: _resize_mask(m, (W, H)) for oid, m in final.items()}
        # Disjoint output: larger objects are painted first so small ones on top stay visible.
        order = sorted(full, key=lambda i: -int(full[i].sum()))
        label = np.zeros((H, W), np.uint16)
        for oid in order:
            label[full[oid]] = oid
        objects: List[TrackedObject] = []
        for oid in sorted(full):
            box = mask_box(full[oid])
            if box is not None:  # what is left of the object in the label image, within its box
                x0, y0, x1, y1 = box
                ys, xs = np.nonzero(label[y0:y1, x0:x1] == oid)
                if xs.size:
                    box = (int(xs.min() + x0), int(ys.min() + y0), int(xs.max() + x0 + 1), int(ys.max() + y0 + 1))
                    objects.append(TrackedObject(
                        oid, box, score.get(oid, 1.0), True, bool(refined.get(oid, False)), int(xs.size),
                        (float(xs.mean() + x0), float(ys.mean() + y0))))
                    continue
            objects.append(TrackedObject(oid, (0, 0, 0, 0), 0.0, False, False, 0, (float("nan"), float("nan"))))
        return FrameResult(t, stamp, (H, W), objects, {}, self.tracker.memory_frames(), label)


def _best_for_clicks(proposals: np.ndarray, scores: np.ndarray, points: np.ndarray,
                     labels: np.ndarray) -> np.ndarray:
    """The proposal that agrees with the most clicks (positives inside, negatives outside); ties
    go to the refiner's score."""
    h, w = proposals.shape[1:]
    xs = np.clip(points[:, 0].astype(int), 0, w - 1)
    ys = np.clip(points[:, 1].astype(int), 0, h - 1)
    agree = [int(((proposals[c][ys, xs]) == (labels == 1)).sum()) for c in range(len(proposals))]
    best = max(range(len(proposals)), key=lambda c: (agree[c], float(scores[c])))
    return proposals[best]
