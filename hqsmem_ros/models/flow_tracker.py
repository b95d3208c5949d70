"""Weight-free base tracker: dense optical flow propagation re-anchored by an appearance model.

Per frame: DIS optical flow (current -> previous) warps every object's prior mask (the committed
mask of t-1, i.e. the HQ mask under teacher forcing) into frame t; a per-object colour
likelihood ratio, learnt from the object's entries in long-term memory, then decides the pixels
near the warped boundary. Long-term memory holds, per stored frame, each object's foreground and
surrounding-background colour histograms; which frames it holds is decided from outside (smart
memory or the fixed-gap rule), exactly like the long-term memory of an AOT-family tracker.

An object whose mask vanishes (left the view, fully occluded) is reported absent and searched
for over the whole frame with its memory's colour model until it is found again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import cv2
import numpy as np

from ..core.interfaces import BaseTracker, Masks
from .appearance import N_COLOR_BINS, color_index, expand_box, histogram, mask_box

_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
_EPS = 1e-3
_LR_CLIP = 4.0


@dataclass
class _Object:
    last_area: int = 0
    absent_frames: int = 0
    recent_bg: Optional[np.ndarray] = None
    lut: Optional[np.ndarray] = None  # per colour bin log-likelihood ratio, None = stale


@dataclass
class _Pending:
    frame: int
    index: np.ndarray
    masks: Masks = field(default_factory=dict)


class FlowTracker(BaseTracker):
    name = "flow"

    def __init__(self, flow_preset: str = "fast", flow_weight: float = 2.0,
                 appearance_weight: float = 1.0, search_margin: float = 0.3,
                 min_area: int = 12, redetect_every: int = 2, redetect_min_lr: float = 1.5,
                 redetect_area_range=(0.3, 3.0), recent_bg_weight: float = 0.5):
        if flow_preset not in _PRESETS:
            raise ValueError(f"flow_preset must be one of {', '.join(_PRESETS)}, got {flow_preset!r}")
        self.flow_preset = flow_preset
        self.flow_weight = float(flow_weight)
        self.appearance_weight = float(appearance_weight)
        self.search_margin = float(search_margin)
        self.min_area = int(min_area)
        self.redetect_every = max(1, int(redetect_every))
        self.redetect_min_lr = float(redetect_min_lr)
        self.redetect_area_range = tuple(redetect_area_range)
        self.recent_bg_weight = float(recent_bg_weight)
        self._flow = cv2.DISOpticalFlow_create(_PRESETS[flow_preset])
        self.reset()

    @classmethod
    def from_config(cls, params, device="auto", precision="fp32"):
        return cls(**params)

    # -- state --------------------------------------------------------------------------------
    def reset(self) -> None:
        self._objects: Dict[int, _Object] = {}
        self._prior: Masks = {}
        self._memory: Dict[int, Dict[int, tuple]] = {}  # frame -> id -> (fg_hist, bg_hist)
        self._prev_gray: Optional[np.ndarray] = None
        self._cache_frame: Optional[int] = None
        self._cache = None
        self._pending: Optional[_Pending] = None

    @property
    def object_ids(self) -> List[int]:
        return sorted(self._objects)

    def add_objects(self, frame: int, image: np.ndarray, masks: Masks) -> None:
        for oid, m in masks.items():
            obj = self._objects.setdefault(int(oid), _Object())
            obj.absent_frames = 0
            obj.last_area = int(m.sum())
            obj.lut = None
            self._prior[int(oid)] = m.astype(bool)

    def remove_objects(self, ids: Iterable[int]) -> None:
        for oid in ids:
            self._objects.pop(oid, None)
            self._prior.pop(oid, None)
            for entry in self._memory.values():
                entry.pop(oid, None)
        self._memory = {f: e for f, e in self._memory.items() if e}

    # -- per frame ----------------------------------------------------------------------------
    def _frame_data(self, frame: int, image: np.ndarray):
        if self._cache_frame != frame or self._cache is None:
            gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
            self._cache = (gray, color_index(image))
            self._cache_frame = frame
        return self._cache

    def track(self, frame: int, image: np.ndarray) -> Masks:
        gray, index = self._frame_data(frame, image)
        h, w = gray.shape
        if not self._objects:
            return {}
        ids = [i for i in self._objects if self._prior.get(i) is not None and self._prior[i].any()]
        warped = {}
        if ids and self._prev_gray is not None and self._prev_gray.shape == gray.shape:
            flow = self._flow.calc(gray, self._prev_gray, None)
            gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
            mx, my = gx + flow[..., 0], gy + flow[..., 1]
            stack = np.stack([self._prior[i] for i in ids], axis=-1).astype(np.float32)
            out = cv2.remap(stack, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            out = out.reshape(h, w, len(ids))
            warped = {i: out[..., k] for k, i in enumerate(ids)}
        elif ids:
            warped = {i: self._prior[i].astype(np.float32) for i in ids}

        best = np.zeros((h, w), np.float32)  # winning logit (> 0) per pixel
        label = np.zeros((h, w), np.int32)
        for oid, wm in warped.items():
            self._segment_near(oid, wm, index, best, label)
        result: Masks = {}
        for oid, obj in self._objects.items():
            m = label == oid
            area = int(m.sum())
            if area < self.min_area:
                m = np.zeros_like(m)
                obj.absent_frames += 1
                if obj.absent_frames % self.redetect_every == 0 or oid not in warped:
                    found = self._redetect(oid, index, label)
                    if found is not None:
                        m = found
                        label[m] = oid
                        obj.absent_frames = 0
            else:
                obj.absent_frames = 0
            result[oid] = m
        return result

    def _segment_near(self, oid, warped, index, best, label):
        core = warped > 0.5
        box = mask_box(warped > 0.05)
        if box is None:
            return
        h, w = warped.shape
        x0, y0, x1, y1 = expand_box(box, self.search_margin, 4, w, h)
        sl = (slice(y0, y1), slice(x0, x1))
        lr = self._lut(oid)[index[sl]]
        logit = self.flow_weight * (2.0 * warped[sl] - 1.0) + self.appearance_weight * lr
        logit = cv2.GaussianBlur(logit, (5, 5), 0)
        fg = (logit > 0).astype(np.uint8)
        n, comp = cv2.connectedComponents(fg, connectivity=8)
        if n > 2:  # keep only pieces connected to where the object was warped to
            keep = np.zeros(n, bool)
            keep[np.unique(comp[core[sl] & (fg > 0)])] = True
            keep[0] = False
            fg = keep[comp].astype(np.uint8)
        win = (fg > 0) & (logit > best[sl])
        best[sl][win] = logit[win]
        label[sl][win] = oid

    def _redetect(self, oid, index, label) -> Optional[np.ndarray]:
        obj = self._objects[oid]
        if obj.last_area <= 0 or not any(oid in e for e in self._memory.values()):
            return None
        lr = self._lut(oid)[index]
        lr = cv2.blur(lr, (5, 5))
        cand = ((lr > self.redetect_min_lr) & (label == 0)).astype(np.uint8)
        n, comp, stats, _ = cv2.connectedComponentsWithStats(cand, connectivity=8)
        lo, hi = self.redetect_area_range
        best_k, best_score = -1, -np.inf
        for k in range(1, n):
            area = stats[k, cv2.CC_STAT_AREA]
            if not lo * obj.last_area <= area <= hi * obj.last_area or area < self.min_area:
                continue
            score = float(lr[comp == k].mean())
            if score > best_score:
                best_k, best_score = k, score
        if best_k < 0 or best_score < self.redetect_min_lr + 0.5:
            return None
        return comp == best_k

    def _lut(self, oid) -> np.ndarray:
        obj = self._objects[oid]
        if obj.lut is None:
            fgs = [e[oid][0] for e in self._memory.values() if oid in e]
            bgs = [e[oid][1] for e in self._memory.values() if oid in e]
            if not fgs:
                return np.zeros(N_COLOR_BINS, np.float32)
            fg = np.mean(fgs, axis=0)
            bg = np.mean(bgs, axis=0)
            if obj.recent_bg is not None:
                bg = (1 - self.recent_bg_weight) * bg + self.recent_bg_weight * obj.recent_bg
            obj.lut = np.clip(np.log((fg + _EPS) / (bg + _EPS)), -_LR_CLIP, _LR_CLIP).astype(np.float32)
        return obj.lut

    def commit(self, frame: int, image: np.ndarray, masks: Masks) -> None:
        gray, index = self._frame_data(frame, image)
        self._prev_gray = gray
        committed = {oid: np.asarray(masks.get(oid, np.zeros_like(gray, bool)), bool) for oid in self._objects}
        self._prior = committed
        union = np.zeros(gray.shape, bool)
        for m in committed.values():
            union |= m
        h, w = gray.shape
        for oid, m in committed.items():
            box = mask_box(m)
            if box is None:
                continue
            obj = self._objects[oid]
            obj.last_area = int(m.sum())
            x0, y0, x1, y1 = expand_box(box, self.search_margin, 4, w, h)
            sl = (slice(y0, y1), slice(x0, x1))
            obj.recent_bg = histogram(index[sl], ~union[sl])
            obj.lut = None
        self._pending = _Pending(frame, index, committed)

    # -- long-term memory ---------------------------------------------------------------------
    def store_memory(self, frame: int) -> None:
        p = self._pending
        if p is None or p.frame != frame:
            raise ValueError(f"store_memory({frame}): frame {frame} is not the last committed frame")
        union = np.zeros(p.index.shape, bool)
        for m in p.masks.values():
            union |= m
        h, w = p.index.shape
        entry = {}
        for oid, m in p.masks.items():
            box = mask_box(m)
            if box is None:
                continue
            x0, y0, x1, y1 = expand_box(box, self.search_margin, 4, w, h)
            sl = (slice(y0, y1), slice(x0, x1))
            entry[oid] = (histogram(p.index[sl], m[sl]), histogram(p.index[sl], ~union[sl]))
            self._objects[oid].lut = None
        self._memory[frame] = entry

    def drop_memory(self, frame: int) -> None:
        entry = self._memory.pop(frame, None)
        for oid in entry or ():
            if oid in self._objects:
                self._objects[oid].lut = None

    def memory_frames(self) -> List[int]:
        return sorted(self._memory)

    def memory_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for e in self._memory.values() for a, b in e.values())
