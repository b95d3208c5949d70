"""Weight-free base tracker: dense optical flow propagation re-anchored by an appearance model.

Per frame: DIS optical flow (current -> previous) warps every object's prior mask (the committed
mask of t-1, i.e. the HQ mask under teacher forcing) into frame t. Dense flow loses small objects
that move far between frames, so each object is also matched as a whole (masked template
matching of its previous appearance in a search window) and the prior shifted by that motion;
of the two predictions the one whose pixels fit the object's colour model better is kept. A
per-object colour likelihood ratio then decides the pixels near the predicted boundary. Long-term
memory holds, per stored frame, each object's foreground and surrounding-background colour
histograms; which frames it holds is decided from outside (smart memory or the fixed-gap rule),
exactly like the long-term memory of an AOT-family tracker.

The colour model (what generalises, docs/benchmarks.md): colours binned finely in chroma (32x32
Cr/Cb bins, 4 luminance bins, `color_bins`); the object's histograms from its prompt frame keep
half the weight (`anchor_weight`), so the model cannot drift with the masks it commits; and an
object's background is everything but the object itself, other objects included
(`others_as_background`), so two similar-looking objects are told apart by the colours in which
they differ, not claimed by each other when they cross.

An object whose mask vanishes (left the view, fully occluded) is reported absent and searched
for over the whole frame with its colour model until it is found again, at the size it had in
long-term memory (not its last, occluded size).

Occlusion order (`occlusion_order`): where two objects meet, the one whose predicted pixels the
other keeps winning is behind it (evidence summed over the frames of the contact, fading). The
pixels a look-alike uncovers as it comes out from behind were the occluder's a frame before, so
the flow carries the occluder's mask onto them and the colour model cannot object; the occluder
may therefore reach no further than its previous mask moved as a whole (its template match) plus
`occluder_slack` pixels, and what it claims beyond goes to the object behind it: the pieces that
touch that object, or, while that object is wholly hidden, the largest piece (it can only come
back from its occluder's edge). While it is still small, a re-emerging object also takes the free
re-detection candidate that touches what it got back.

Motion push (`motion_weight`): background the prior took in over earlier frames and the colours
cannot tell from the object (a look-alike animal, a fence or pole the object passes, ground of
its colour) keeps its place through the flow prior. Where such pixels move as the surroundings
do and not as the object does (2-D Gaussian models of the flow inside the warped prior and
outside it), their log-likelihood ratio pushes them out. Only out: what moves with the object
(its shadow, its reflection, textureless ground the object's flow spills onto) is not pulled in;
the prior's edge, where the flow blends both sides, is spared (`motion_band`); and between
tracked objects (where another's prediction reaches, or while two are in an occlusion order)
the colours and the order decide. Where the object moves as its surroundings do the two models
coincide and the push is nothing.

Exposure level (`exposure_level`, off by default): the colours are binned as if every frame had
that median luminance, so the luminance bins no longer depend on the camera's exposure
(docs/benchmarks.md "Camera conditions": it removes most of an exposure ramp's loss, but was not
chosen leave-one-out). Exposure range (`exposure_range`, off in the Settings, [128, 192] in
config/track.yaml, chosen leave-one-out): only a frame whose median
luminance lies outside the range is brought to its nearer end, so a normally exposed camera's
colours are binned as it gives them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import cv2
import numpy as np

from ..core.interfaces import BaseTracker, Masks
from ..core.settings import setting
from .appearance import color_index, expand_box, histogram, mask_box

_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
_EPS = 1e-3
_LR_CLIP = 4.0
_REMAP_CHANNELS = 64
_GAIN_RANGE = (0.25, 4.0)  # the exposure_level gain is held inside this (a black frame stays black)


@dataclass
class _Object:
    last_area: int = 0
    absent_frames: int = 0
    recent_bg: Optional[np.ndarray] = None
    lut: Optional[np.ndarray] = None  # per colour bin log-likelihood ratio, None = stale
    anchor: Optional[tuple] = None  # (fg_hist, bg_hist) of the object's prompt frame


@dataclass
class _Pending:
    frame: int
    index: np.ndarray
    masks: Masks = field(default_factory=dict)


def _color_bins_ok(bins) -> bool:
    yb, cb = bins
    return 1 <= yb <= 256 and 1 <= cb <= 64 and not yb & (yb - 1) and not cb & (cb - 1)


def _exposure_range_ok(bounds) -> bool:
    low, high = bounds
    return 0.0 <= low <= high <= 255.0


def _grown(mask: np.ndarray) -> np.ndarray:
    """The mask and its 8 neighbours (what touches it)."""
    return cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)


@dataclass
class FlowSettings:
    flow_preset: str = setting("fast", "DIS optical flow preset (speed against accuracy of the flow)",
                               choices=tuple(_PRESETS))
    flow_weight: float = setting(2.0, "Weight of the flow-warped prior mask in each pixel's object score",
                                 minimum=0.0)
    appearance_weight: float = setting(1.0, "Weight of the colour log-likelihood ratio in each pixel's "
                                       "object score", minimum=0.0)
    search_margin: float = setting(0.3, "Pixels are decided in the object's box grown by this fraction "
                                   "of its size", minimum=0.0)
    min_area: int = setting(12, "An object whose mask is smaller (pixels) is reported absent and "
                            "searched for", minimum=0)
    redetect_every: int = setting(2, "An absent object is searched for over the whole frame every N "
                                  "frames (0 or 1: every frame)", minimum=0)
    redetect_min_lr: float = setting(0.5, "Smallest colour log-likelihood ratio of a pixel of a "
                                     "re-detection candidate")
    redetect_area_range: Tuple[float, float] = setting(
        (0.3, 3.0), "Area of a re-detection candidate, relative to the object's area in long-term "
        "memory: [smallest, largest]", minimum=0.0)
    recent_bg_weight: float = setting(0.5, "Weight of the last frame's background colours in the "
                                      "background model", minimum=0.0, maximum=1.0)
    match_search: float = setting(1.0, "Whole-object template matching searches the box grown by this "
                                  "fraction of its size (0: no matching, flow only)", minimum=0.0)
    match_size: int = setting(32, "Templates are matched downscaled to this longer side (pixels)",
                              minimum=1)
    smooth: int = setting(5, "Gaussian smoothing of the object score (kernel pixels, made odd)", minimum=0)
    anchor_weight: float = setting(0.5, "Weight of the object's prompt-frame colour histograms in its "
                                   "colour model (the rest: the frames in long-term memory)",
                                   minimum=0.0, maximum=1.0)
    others_as_background: bool = setting(True, "Other objects' pixels count as this object's "
                                         "background (similar-looking objects are told apart)")
    color_bins: Tuple[int, int] = setting(
        (4, 32), "Colour histogram bins: [luminance, chroma per axis]", check=_color_bins_ok,
        rule="two powers of two, luminance <= 256 and chroma <= 64")
    occlusion_order: bool = setting(False, "Keep which object is in front of which (the one that "
                                    "takes another's predicted pixels); the pixels a front object "
                                    "claims beyond its own rigid motion, next to the object behind "
                                    "it (or while that one is hidden), go to the object behind")
    occluder_slack: int = setting(2, "With occlusion_order: how far (pixels) a front object's mask may "
                                  "reach beyond its rigidly moved previous mask", minimum=0)
    motion_weight: float = setting(0.0, "Weight of the motion push in each pixel's object score: pixels "
                                   "whose flow is more like the surroundings' than the object's are "
                                   "pushed out, as their log-likelihood ratio (0: off)", minimum=0.0)
    motion_noise: float = setting(0.5, "With motion_weight: flow noise (pixels at the processing size) "
                                  "added to both motion models' spread", minimum=0.01)
    motion_band: float = setting(3.0, "With motion_weight: the push grows to full strength over this many "
                                 "pixels inside the prior's edge (where the flow blends both sides)",
                                 minimum=0.0)
    exposure_level: float = setting(0.0, "0: colours binned as the camera gives them; L > 0: each frame "
                                    "scaled so that its median luminance is L before its colours are "
                                    "binned (the colour model made independent of the exposure)",
                                    minimum=0.0, maximum=255.0)
    exposure_range: Tuple[float, float] = setting(
        (0.0, 255.0), "[low, high]: a frame whose median luminance lies outside is scaled to the nearer "
        "end before its colours are binned; inside it the colours are binned as the camera gives them "
        "([0, 255]: off; [L, L] is exposure_level L)", check=_exposure_range_ok,
        rule="0 <= low <= high <= 255")


class FlowTracker(BaseTracker):
    name = "flow"
    Settings = FlowSettings

    def __init__(self, **params):
        s = self.apply_settings(params)  # every setting an attribute; derived ones below
        self.redetect_every = max(1, s.redetect_every)
        self.smooth = s.smooth | 1
        yb, cb = s.color_bins
        self._n_bins = yb * cb * cb
        self._flow = cv2.DISOpticalFlow_create(_PRESETS[s.flow_preset])
        self._exposure_bounds = self._exposure_bounds_of(s)
        self.reset()

    @staticmethod
    def _exposure_bounds_of(s) -> Optional[Tuple[float, float]]:
        """The median luminance range the colours are binned in (None: as the camera gives them)."""
        ranged = tuple(s.exposure_range) != (0.0, 255.0)
        if s.exposure_level > 0 and ranged:
            raise ValueError("exposure_level and exposure_range both set: set only one "
                             f"(exposure_level={s.exposure_level}, exposure_range={list(s.exposure_range)})")
        if s.exposure_level > 0:
            return (s.exposure_level, s.exposure_level)
        return (float(s.exposure_range[0]), float(s.exposure_range[1])) if ranged else None

    # -- state --------------------------------------------------------------------------------
    def reset(self) -> None:
        self._objects: Dict[int, _Object] = {}
        self._prior: Masks = {}
        self._memory: Dict[int, Dict[int, tuple]] = {}  # frame -> id -> (fg_hist, bg_hist)
        self._prev_gray: Optional[np.ndarray] = None
        self._prev_rgb: Optional[np.ndarray] = None
        self._cache_frame: Optional[int] = None
        self._cache = None
        self._pending: Optional[_Pending] = None
        self._frame_flow: Optional[np.ndarray] = None  # this frame's flow (current -> previous)
        self._behind: Dict[int, int] = {}  # object -> the object in front of it
        self._covered: Dict[Tuple[int, int], float] = {}  # (front, back) -> pixels front took from back

    @property
    def object_ids(self) -> List[int]:
        return sorted(self._objects)

    def add_objects(self, frame: int, image: np.ndarray, masks: Masks) -> None:
        gray, index = self._frame_data(frame, image)
        h, w = gray.shape
        union = np.zeros((h, w), bool)
        for m in masks.values():
            union |= np.asarray(m, bool)
        for oid, m in masks.items():
            obj = self._objects.setdefault(int(oid), _Object())
            obj.absent_frames = 0
            obj.last_area = int(m.sum())
            obj.lut = None
            m = np.asarray(m, bool)
            self._prior[int(oid)] = m
            box = mask_box(m)
            if box is not None:
                x0, y0, x1, y1 = expand_box(box, self.search_margin, 4, w, h)
                sl = (slice(y0, y1), slice(x0, x1))
                obj.anchor = (histogram(index[sl], m[sl], self._n_bins), histogram(index[sl], self._bg(m, union)[sl], self._n_bins))

    def remove_objects(self, ids: Iterable[int]) -> None:
        for oid in ids:
            self._objects.pop(oid, None)
            self._prior.pop(oid, None)
            self._behind = {b: f for b, f in self._behind.items() if oid not in (b, f)}
            self._covered = {k: c for k, c in self._covered.items() if oid not in k}
            for entry in self._memory.values():
                entry.pop(oid, None)
        self._memory = {f: e for f, e in self._memory.items() if e}

    def _bg(self, own: np.ndarray, union: np.ndarray) -> np.ndarray:
        """Pixels that count as an object's background: everything but the object itself (other
        objects included, so that two similar-looking objects are told apart by the colours that
        differ), or, with others_as_background off, only pixels of no object."""
        return ~own if self.others_as_background else ~union

    # -- per frame ----------------------------------------------------------------------------
    def _frame_data(self, frame: int, image: np.ndarray):
        if self._cache_frame != frame or self._cache is None:
            gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
            if self._exposure_bounds is not None:
                median = max(float(np.median(gray[::2, ::2])), 1.0)
                target = float(np.clip(median, *self._exposure_bounds))
                if target != median:
                    gain = float(np.clip(target / median, *_GAIN_RANGE))
                    image = cv2.convertScaleAbs(image, alpha=gain)
            self._cache = (gray, color_index(image, *self.color_bins))
            self._cache_frame = frame
        return self._cache

    def track(self, frame: int, image: np.ndarray) -> Masks:
        gray, index = self._frame_data(frame, image)
        h, w = gray.shape
        if not self._objects:
            return {}
        ids = [i for i in self._objects if self._prior.get(i) is not None and self._prior[i].any()]
        warped = {}
        self._frame_flow = None
        if ids and self._prev_gray is not None and self._prev_gray.shape == gray.shape:
            flow = self._flow.calc(gray, self._prev_gray, None)
            self._frame_flow = flow
            gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
            mx, my = gx + flow[..., 0], gy + flow[..., 1]
            # cv2.remap returns a single channel for stacks of more than 128 channels: warp the
            # priors in chunks of at most _REMAP_CHANNELS.
            for c0 in range(0, len(ids), _REMAP_CHANNELS):
                chunk = ids[c0:c0 + _REMAP_CHANNELS]
                stack = np.stack([self._prior[i] for i in chunk], axis=-1).astype(np.float32)
                out = cv2.remap(stack, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
                out = out.reshape(h, w, len(chunk))
                warped.update({i: out[..., k] for k, i in enumerate(chunk)})
        elif ids:
            warped = {i: self._prior[i].astype(np.float32) for i in ids}
        rigid = {i: self._prior[i].astype(np.float32) for i in ids}  # each prior moved as a whole
        if self._prev_rgb is not None and self._prev_rgb.shape == image.shape and self.match_search > 0:
            for oid in ids:
                shifted = self._match_shift(oid, image)
                if shifted is not None:
                    rigid[oid] = shifted
                if shifted is not None and self._fit(oid, shifted, index) > self._fit(oid, warped[oid], index):
                    warped[oid] = shifted

        best = np.zeros((h, w), np.float32)  # winning logit (> 0) per pixel
        label = np.zeros((h, w), np.int32)
        reach = None  # how many objects' predictions reach each pixel (> 0.05), for the push
        if self.motion_weight > 0 and len(warped) > 1:
            reach = np.zeros((h, w), np.uint16)
            for wm in warped.values():
                reach += wm > 0.05
        for oid, wm in warped.items():
            self._segment_near(oid, wm, index, best, label, reach)
        if self.occlusion_order and len(self._objects) > 1:
            self._update_depth_order(warped, label)
            self._give_back_revealed(rigid, label)
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
                if oid in self._behind:
                    m = self._regrow_reemerging(oid, m, index, label)
            result[oid] = m
        return result

    def _segment_near(self, oid, warped, index, best, label, reach=None):
        core = warped > 0.5
        box = mask_box(warped > 0.05)
        if box is None:
            return
        h, w = warped.shape
        x0, y0, x1, y1 = expand_box(box, self.search_margin, 4, w, h)
        sl = (slice(y0, y1), slice(x0, x1))
        lr = self._lut(oid)[index[sl]]
        logit = self.flow_weight * (2.0 * warped[sl] - 1.0) + self.appearance_weight * lr
        # While it is behind or in front of another object, no push: the flow of what is being
        # covered or uncovered is not that of either object, and the order decides there.
        occluding = oid in self._behind or oid in self._behind.values()
        if self.motion_weight > 0 and self._frame_flow is not None and not occluding:
            push = self._motion_push(warped[sl], self._frame_flow[sl])
            if reach is not None:  # between tracked objects the colours and the order decide
                push[reach[sl] > (warped[sl] > 0.05)] = 0.0
            logit += self.motion_weight * push
        logit = cv2.GaussianBlur(logit, (self.smooth, self.smooth), 0)
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

    def _motion_push(self, warped: np.ndarray, flow: np.ndarray) -> np.ndarray:
        """Per pixel of a crop, <= 0: the log-likelihood ratio of its flow under the object's
        motion model against its surroundings' (2-D Gaussians of the flow inside the warped prior's
        interior and outside it, each spread widened by motion_noise), where it favours the
        surroundings; ramped in over motion_band pixels inside the prior's edge.

        What it removes is background the prior took in earlier frames and the colours cannot
        tell from the object (a look-alike, a static structure it passes) that moves as the
        surroundings do. Only a push out: what moves with the object is not pulled in (a shadow,
        a reflection, textureless ground whose flow the object's spills onto). The ramp leaves
        the prior's own edge alone, where the flow is a blend of both sides. Where the object
        moves as its surroundings do the two models coincide and the ratio is near 0."""
        inner, outer = warped > 0.95, warped < 0.05
        if inner.sum() < 8 or outer.sum() < 8:
            return np.zeros(warped.shape, np.float32)
        loglik = []
        for region in (inner, outer):
            samples = flow[region].astype(np.float64)
            cov = np.cov(samples.T) + (self.motion_noise ** 2) * np.eye(2)
            inv = np.linalg.inv(cov).astype(np.float32)
            dx, dy = flow[..., 0] - np.float32(samples[:, 0].mean()), flow[..., 1] - np.float32(samples[:, 1].mean())
            maha = inv[0, 0] * dx * dx + 2 * inv[0, 1] * dx * dy + inv[1, 1] * dy * dy
            loglik.append(-0.5 * maha - np.float32(0.5 * np.log(np.linalg.det(cov))))
        push = np.clip(loglik[0] - loglik[1], -_LR_CLIP, 0.0).astype(np.float32)
        if self.motion_band > 0:
            depth = cv2.distanceTransform((warped > 0.5).astype(np.uint8), cv2.DIST_L2, 3)
            push *= np.minimum(depth / self.motion_band, 1.0)
        return push

    # -- occlusion ----------------------------------------------------------------------------
    def _update_depth_order(self, warped: Masks, label: np.ndarray) -> None:
        """Who covers whom: the pixels of each object's prediction that another object wins,
        summed over frames (older frames fading). The one that has lost min_area pixels more to
        the other is behind it. A pair is forgotten once the object behind is visible and no
        longer touches its occluder."""
        # Old evidence fades (halved in about 7 frames): the order is that of the current contact.
        self._covered = {k: c * 0.9 for k, c in self._covered.items() if c * 0.9 >= 1.0}
        for oid, wm in warped.items():
            lost = label[(wm > 0.5) & (label != oid) & (label > 0)]
            for front, count in enumerate(np.bincount(lost)):
                if count and front != oid:
                    key = (front, oid)
                    self._covered[key] = self._covered.get(key, 0.0) + float(count)
        for (front, back), count in list(self._covered.items()):
            if count - self._covered.get((back, front), 0) >= max(1, self.min_area):
                self._behind[back] = front
                if self._behind.get(front) == back:  # the newer evidence reverses the order
                    del self._behind[front]
        for back, front in list(self._behind.items()):
            own = label == back
            gone = front not in self._objects or back not in self._objects
            if gone or (own.sum() >= max(1, self.min_area) and not (_grown(own) & (label == front)).any()):
                del self._behind[back]
                self._covered.pop((front, back), None)
                self._covered.pop((back, front), None)

    def _give_back_revealed(self, rigid: Masks, label: np.ndarray) -> None:
        """An occluder's mask claims the pixels the object behind it uncovers (the flow there
        points into the occluder, the colours look alike): the pixels it holds beyond its own
        previous mask moved rigidly (+ occluder_slack) go to the object behind it, where they
        touch that object or, while it is hidden, as the largest such piece."""
        k = 2 * self.occluder_slack + 1
        for back, front in self._behind.items():
            if front not in rigid:
                continue
            allowed = cv2.dilate((rigid[front] > 0.5).astype(np.uint8), np.ones((k, k), np.uint8))
            excess = ((label == front) & (allowed == 0)).astype(np.uint8)
            if int(excess.sum()) < max(1, self.min_area):
                continue
            n, comp, stats, _ = cv2.connectedComponentsWithStats(excess, connectivity=8)
            own = label == back
            if own.sum() >= max(1, self.min_area):
                touching = np.unique(comp[_grown(own)])
                pieces = [c for c in touching if c > 0]
            else:
                sizes = stats[1:, cv2.CC_STAT_AREA]
                pieces = [1 + int(sizes.argmax())] if n > 1 and sizes.max() >= self.min_area else []
            for c in pieces:
                label[comp == c] = back

    def _regrow_reemerging(self, oid, own: np.ndarray, index, label) -> np.ndarray:
        """An object coming out from behind its occluder holds only the pieces given back so far
        (its flow prior is small): the re-detection candidate of free pixels that touches them is
        the rest of it, as an object found again after being lost would get."""
        areas = [e[oid][2] for e in self._memory.values() if oid in e]
        if not areas or own.sum() >= self.redetect_area_range[0] * float(np.median(areas)):
            return own
        found = self._redetect(oid, index, label)
        if found is None or not (_grown(own) & found).any():
            return own
        label[found] = oid
        return own | found

    def _match_shift(self, oid, image) -> Optional[np.ndarray]:
        """The prior moved by the object's best whole-object match in a window around it."""
        prior = self._prior[oid]
        box = mask_box(prior)
        if box is None:
            return None
        h, w = prior.shape
        x0, y0, x1, y1 = box
        sx0, sy0, sx1, sy1 = expand_box(box, self.match_search, 16, w, h)
        window = image[sy0:sy1, sx0:sx1]
        template = self._prev_rgb[y0:y1, x0:x1]
        weight = prior[y0:y1, x0:x1].astype(np.uint8)
        if window.shape[0] <= template.shape[0] or window.shape[1] <= template.shape[1]:
            return None
        # Matching cost grows with template area x window area: match large objects at a
        # coarser scale (the colour model then settles the last pixels).
        f = min(1.0, self.match_size / max(template.shape[:2]))
        if f < 1.0:
            window = cv2.resize(window, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
            th, tw = max(1, int(template.shape[0] * f)), max(1, int(template.shape[1] * f))
            template = cv2.resize(template, (tw, th), interpolation=cv2.INTER_AREA)
            weight = cv2.resize(weight, (tw, th), interpolation=cv2.INTER_NEAREST)
            if window.shape[0] <= th or window.shape[1] <= tw or not weight.any():
                return None
        score = cv2.matchTemplate(window, template, cv2.TM_SQDIFF, mask=weight)
        _, _, best, _ = cv2.minMaxLoc(score)
        dx = int(round(sx0 + best[0] / f - x0))
        dy = int(round(sy0 + best[1] / f - y0))
        if dx == 0 and dy == 0:
            return None
        move = np.float32([[1, 0, dx], [0, 1, dy]])
        return cv2.warpAffine(prior.astype(np.float32), move, (w, h), flags=cv2.INTER_NEAREST)

    def _fit(self, oid, soft: np.ndarray, index) -> float:
        """Mean colour log-likelihood ratio of the object under a predicted mask."""
        m = soft > 0.5
        box = mask_box(m)
        if box is None:
            return -np.inf
        x0, y0, x1, y1 = box
        return float(self._lut(oid)[index[y0:y1, x0:x1][m[y0:y1, x0:x1]]].mean())

    def _redetect(self, oid, index, label) -> Optional[np.ndarray]:
        areas = [e[oid][2] for e in self._memory.values() if oid in e]
        if not areas:
            return None
        # The size to look for: the object's typical size in long-term memory, not its last one
        # (which shrinks to nothing while it is being occluded).
        ref_area = float(np.median(areas))
        lr = self._lut(oid)[index]
        lr = cv2.blur(lr, (5, 5))
        cand = ((lr > self.redetect_min_lr) & (label == 0)).astype(np.uint8)
        n, comp, stats, _ = cv2.connectedComponentsWithStats(cand, connectivity=8)
        lo, hi = self.redetect_area_range
        best_k, best_score = -1, -np.inf
        for k in range(1, n):
            area = stats[k, cv2.CC_STAT_AREA]
            if not lo * ref_area <= area <= hi * ref_area or area < self.min_area:
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
                return np.zeros(self._n_bins, np.float32)
            fg = np.mean(fgs, axis=0)
            bg = np.mean(bgs, axis=0)
            if obj.anchor is not None and self.anchor_weight > 0:
                fg = (1 - self.anchor_weight) * fg + self.anchor_weight * obj.anchor[0]
                bg = (1 - self.anchor_weight) * bg + self.anchor_weight * obj.anchor[1]
            if obj.recent_bg is not None:
                bg = (1 - self.recent_bg_weight) * bg + self.recent_bg_weight * obj.recent_bg
            obj.lut = np.clip(np.log((fg + _EPS) / (bg + _EPS)), -_LR_CLIP, _LR_CLIP).astype(np.float32)
        return obj.lut

    def commit(self, frame: int, image: np.ndarray, masks: Masks) -> None:
        gray, index = self._frame_data(frame, image)
        self._prev_gray = gray
        self._prev_rgb = image
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
            obj.recent_bg = histogram(index[sl], self._bg(m, union)[sl], self._n_bins)
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
            entry[oid] = (histogram(p.index[sl], m[sl], self._n_bins),
                          histogram(p.index[sl], self._bg(m, union)[sl], self._n_bins), int(m.sum()))
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
        return sum(a.nbytes + b.nbytes + 8 for e in self._memory.values() for a, b, _ in e.values())

