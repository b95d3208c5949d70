"""SAM 2.1 as the HQ-SMem base tracker, streaming, on the `sam2` package's own network blocks.

SAM2VideoPredictor is built for offline clips: it loads a whole folder of frames, keeps every
frame's outputs for the whole video and runs one object at a time. This wrapper takes frames one
at a time and drives the network's building blocks directly (image encoder, memory attention,
SAM mask decoder, memory encoder, the prompt path of `track_step`), with its own memory state:

- Memory entries. Committing frame t writes, per object, SAM2's memory for that frame: the
  memory encoder's `maskmem_features` (kept in bfloat16 as the predictor does; in float16 under
  fp16) and the object pointer. `maskmem_pos_enc` is the same for every frame and object, so one
  copy is kept.
- Conditioning frames are the prompt frames: an object's mask prompt goes through SAM2's prompt
  path (`track_step` with the mask as input, no memory read) and its memory is encoded from the
  binarised mask, as the predictor does before propagation. They are held in long-term memory
  (the pipeline pins them). An object's last conditioning frame is never freed while it lives:
  SAM2 cannot track without one; if the pipeline drops it (more prompt frames than capacity),
  that object's row is kept and the frame stays listed in `memory_frames()`.
- Which past frames the memory attention reads (the non-conditioning memory), `memory_rule`:
  * "auto" (default): "pipeline" when the pipeline runs smart memory, "sam2" when it does not
    (the base ablations: SAM2's own rule). The pipeline says which through
    `set_memory_policy(smart_memory, capacity)`; until it is called, "pipeline".
  * "pipeline" (for smart memory): the last `recent_frames` committed frames (default
    1: the previous frame, i.e. the prior y_{t-1}, always read, as SAM2 always reads t-1) plus
    the frames the pipeline wrote with `store_memory` and has not dropped. Temporal encodings go
    by recency rank (newest = SAM2's t-1 slot); frames beyond SAM2's num_maskmem-1 slots share
    the oldest slot. With smart memory on, long-term memory is bounded by memory_capacity.
  * "sam2": SAM2's own rule, exactly: the num_maskmem-1 most recent committed frames at stride
    `memory_stride` (SAM2's r), held in a FIFO by the tracker; long-term memory holds the prompt
    rows only. The pipeline's store_memory / drop_memory of non-prompt frames are ignored (smart
    memory has no effect): use it for the base ablations or to reproduce SAM2.
  Object pointers follow SAM2's rule in both: conditioning frames plus the last
  max_obj_ptrs_in_encoder-1 frames (a ring of small vectors).
- Teacher forcing (Eq. 10): `commit` encodes the committed masks. A mask equal to the tracker's
  own output uses SAM2's own memory of its prediction (the soft logits, bit-identical to the
  predictor); any other mask (a refinement) is resized to SAM2's input as `add_new_mask` does,
  binarised and encoded; SAM2's no-object embedding follows that mask. The object pointer stays
  the tracker's. Objects prompted on the frame keep their prompt's memory.
- Objects are batched: all objects run in one forward pass. Objects whose memory has the same
  layout (number of conditioning frames, temporal slots, pointers; e.g. prompted on the same
  frame) are batched exactly as SAM2 would batch them. Objects whose memory differs (prompted on
  different frames: each reads a different number of memory frames and pointers) join the same
  pass with each object's memory tokens built as in its own pass, padded to the longest, and the
  padding masked out of the memory cross-attention (`batch_mixed_layouts`, default on; off:
  one pass per layout). Masked and separate passes agree to float rounding (tested). Each
  object's state lives in its own rows, so adding or removing one leaves the others' memory
  untouched.
- Nothing about a frame outside memory survives its commit except its object pointers while
  they are in the ring (features, logits, images are freed), so host and device memory are
  bounded by a fixed number of frames and do not grow with the stream.
- SAM2's hole filling of output masks needs its compiled CUDA kernel (`sam2._C`); without it the
  predictor skips the step with a warning, and so does this tracker.

Input frames are resized to SAM2's square input exactly as the predictor's JPEG loader does
(PIL resize, /255, ImageNet mean/std) and masks come back at the input size via the predictor's
bilinear upsampling of SAM2's low-resolution logits (> 0).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..core.config import ConfigError
from ..core.interfaces import BaseTracker, Masks
from ..core.settings import setting
from .checkpoints import WeightSettings, apply_state_dict, check_precision, load_state_dict, resolve_device
from .sam2_model import (ALIASES, MODELS, RELEASED, MemoryTokens, _Entry, _Layout, _masked_cross_attention,  # noqa: F401
                         _Pred, _Row, build_model, fill_holes_in_mask_scores, resolve_model)

log = logging.getLogger(__name__)

MEMORY_RULES = ("auto", "pipeline", "sam2")
_REFUSED = {
    "num_maskmem": "it sets the size of a trained parameter (maskmem_tpos_enc); the memory the "
                   "tracker reads is chosen by memory_rule / the pipeline's memory_capacity",
    "max_cond_frames_in_attn": "prompt frames are conditioning frames; the pipeline decides how many stay",
}
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_MASK_LOGIT = 1024.0  # |logit| whose sigmoid is exactly 0 or 1 in float32: a binarised mask
_HAS_HOLE_FILLER = importlib.util.find_spec("sam2._C") is not None


@dataclass
class SAM2Settings(WeightSettings):
    REFUSED: ClassVar[Dict[str, str]] = _REFUSED
    model: str = setting("sam2.1_hiera_tiny", "SAM 2.1 network (the checkpoint must hold its weights)",
                         choices=tuple(MODELS) + tuple(ALIASES))
    image_size: Optional[int] = setting(None, "SAM2's square input size, pixels (unset: the model's 1024)",
                                        check=lambda v: v >= 64 and v % 32 == 0,
                                        rule="a multiple of 32, at least 64")
    memory_rule: str = setting("auto", "Which past frames the memory attention reads: the pipeline's "
                               "(smart memory), SAM2's own rule, or auto (the pipeline's when it runs "
                               "smart memory)", choices=MEMORY_RULES)
    recent_frames: int = setting(1, "With the pipeline's rule: the last N committed frames are always "
                                 "read", minimum=1)
    memory_stride: Optional[int] = setting(None, "With SAM2's rule: its memory stride r (unset: the "
                                           "model's)", minimum=1)
    max_objects: Optional[int] = setting(None, "Most objects tracked at once (unset: no limit)", minimum=1)
    fill_hole_area: Optional[int] = setting(None, "Holes up to this area (pixels) are filled in output "
                                            "masks; needs SAM2's CUDA kernel (unset: the model's)",
                                            minimum=0)
    batch_mixed_layouts: bool = setting(True, "Objects whose memory differs share one forward pass "
                                        "(padded and masked); false: one pass per layout")


class SAM2Tracker(MemoryTokens, BaseTracker):
    """HQ-SMem's base tracker y_t = D(E(x_t); M_t; y_{t-1}) on SAM 2.1 (see the module doc)."""

    name = "sam2"
    takes_precision = True
    Settings = SAM2Settings

    def __init__(self, net, model: str, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
                 memory_rule: str = "auto", recent_frames: int = 1, memory_stride: Optional[int] = None,
                 max_objects: Optional[int] = None, fill_hole_area: Optional[int] = None,
                 batch_mixed_layouts: bool = True):
        if memory_rule not in MEMORY_RULES:
            raise ValueError(f"memory_rule must be one of {', '.join(MEMORY_RULES)}, got {memory_rule!r}")
        self.model = model
        self.net = net.to(device).eval()
        # The predictor runs one object at a time, so SAM2's cross-object constraint in the memory
        # encoder never fires there; batching objects must not switch it on either.
        self.net.non_overlap_masks_for_mem_enc = False
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        # Memory features are stored in bfloat16 as the predictor does, except under fp16 autocast,
        # which cannot concatenate bfloat16 tensors (its type promotion knows only fp16 and fp32).
        self._memory_dtype = torch.float16 if amp_dtype == torch.float16 else torch.bfloat16
        self.memory_rule = memory_rule
        self.recent_frames = int(recent_frames)
        self.memory_stride = int(memory_stride if memory_stride is not None else net.memory_temporal_stride_for_eval)
        if self.recent_frames < 1 or self.memory_stride < 1:
            raise ValueError("recent_frames and memory_stride must be positive integers")
        if max_objects is not None:
            self.max_objects = int(max_objects)
        self.fill_hole_area = int(net.fill_hole_area if fill_hole_area is None else fill_hole_area)
        self.batch_mixed_layouts = bool(batch_mixed_layouts)
        self.image_size = int(net.image_size)
        self.num_maskmem = int(net.num_maskmem)
        self.max_ptrs = int(net.max_obj_ptrs_in_encoder)
        self._mean = torch.tensor(_MEAN, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(_STD, dtype=torch.float32)[:, None, None]
        self._warned_ignored_drop = False
        self._smart_memory: Optional[bool] = None
        self.memory_capacity: Optional[int] = None
        self.last_batches: List[List[int]] = []  # object ids per forward pass on the last frame
        self.reset()

    def set_memory_policy(self, smart_memory: bool, capacity: Optional[int] = None) -> None:
        """Told by the pipeline (before the stream) whether smart memory manages long-term
        memory; memory_rule 'auto' follows it. `capacity` is informational."""
        self._smart_memory = bool(smart_memory)
        self.memory_capacity = capacity

    @property
    def effective_memory_rule(self) -> str:
        if self.memory_rule != "auto":
            return self.memory_rule
        return "sam2" if self._smart_memory is False else "pipeline"

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, params: Dict[str, Any], device: str = "auto", precision: str = "fp32") -> "SAM2Tracker":
        s = cls.parse_settings(params)
        model, checkpoint, seed = resolve_model(s.model), s.checkpoint, s.seed
        if checkpoint and s.random_weights:
            raise ConfigError("tracker 'sam2': give either checkpoint or random_weights: true, not both")
        if not checkpoint and not s.random_weights:
            raise ConfigError(
                f"tracker 'sam2': no checkpoint for model {model!r}; set checkpoint: <path to the official "
                f"{MODELS[model][2]}>, get it {RELEASED} (random_weights: true runs untrained weights, for speed "
                "benchmarks only)")
        dev = resolve_device(device)
        amp = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[check_precision(dev, precision)]
        net = build_model(model, s.image_size, seed)
        if checkpoint:
            # Official files hold {'model': state_dict}; load_state_dict unwraps it without pickle code.
            sd = load_state_dict(checkpoint, expected_model=f"sam2 {model}", sha256=s.sha256,
                                 where=f"get {MODELS[model][2]} {RELEASED}")
            apply_state_dict(net, sd, checkpoint, f"sam2 {model}",
                             hint=f"The official SAM 2.1 files are {', '.join(m[2] for m in MODELS.values())}.")
        else:
            log.warning("tracker 'sam2' runs %s with RANDOM weights (seed %d): masks are meaningless", model, seed)
        return cls(net, model, dev, amp, memory_rule=s.memory_rule, recent_frames=s.recent_frames,
                   memory_stride=s.memory_stride, max_objects=s.max_objects,
                   fill_hole_area=s.fill_hole_area, batch_mixed_layouts=s.batch_mixed_layouts)

    def _ctx(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.amp_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.amp_dtype))
        return stack

    # -- state --------------------------------------------------------------------------------
    def reset(self) -> None:
        self._ids: List[int] = []                                 # tracked objects, in prompt order
        self._cond: Dict[int, "OrderedDict[int, _Row]"] = {}      # object -> its conditioning frames
        self._recent: "OrderedDict[int, _Entry]" = OrderedDict()  # the tracker's own recent frames
        self._bank: Dict[int, _Entry] = {}                        # long-term: prompt + stored frames
        self._ptr_ring: "OrderedDict[int, Dict[int, torch.Tensor]]" = OrderedDict()
        self._mem_pos: Optional[torch.Tensor] = None              # maskmem_pos_enc, same for all
        self._size: Optional[Tuple[int, int]] = None
        self._last_committed: Optional[int] = None
        self._clear_frame()

    def _clear_frame(self) -> None:
        self._frame: Optional[int] = None
        self._backbone = None
        self._preds: Dict[int, _Pred] = {}
        self._prompted: Dict[int, _Pred] = {}

    @property
    def object_ids(self) -> List[int]:
        return sorted(self._ids)

    def _check_image(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"SAM2 expects an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
        if self._size is None:
            self._size = image.shape[:2]
        elif image.shape[:2] != self._size:
            raise ValueError(f"image size changed from {self._size[1]}x{self._size[0]} to "
                             f"{image.shape[1]}x{image.shape[0]}; reset() the tracker first")
        return image

    def _begin(self, frame: int, image: np.ndarray) -> None:
        """Start work on `frame` (or continue it): frames must come in increasing order."""
        if self._frame == frame:
            return
        if self._last_committed is not None and frame <= self._last_committed:
            raise ValueError(f"frame {frame} is not after the last committed frame {self._last_committed}; "
                             "frames must come in increasing order (reset() for a new stream)")
        if self._frame is not None and (self._preds or self._prompted):
            # A frame that was never committed (the caller gave up on it): forget its work.
            log.warning("tracker 'sam2': frame %d was not committed; its predictions are dropped", self._frame)
        self._clear_frame()
        self._frame = frame
        x = self._to_input(image)
        self._backbone = self.net.forward_image(x)

    def _to_input(self, image: np.ndarray) -> torch.Tensor:
        # The predictor's JPEG loader, step for step: PIL resize to SxS (bicubic), /255 in
        # float64, stored as float32, then mean/std in float32.
        s = self.image_size
        arr = np.array(Image.fromarray(np.ascontiguousarray(image)).resize((s, s)))
        x = torch.from_numpy(arr / 255.0).permute(2, 0, 1).float().to(self.device)
        x -= self._mean.to(self.device)
        x /= self._std.to(self.device)
        return x.unsqueeze(0)

    def _features(self, batch: int):
        """The cached frame features expanded to `batch` objects, as the predictor prepares them."""
        out = {
            "backbone_fpn": [f.expand(batch, -1, -1, -1) for f in self._backbone["backbone_fpn"]],
            "vision_pos_enc": [p.expand(batch, -1, -1, -1) for p in self._backbone["vision_pos_enc"]],
        }
        _, feats, pos, sizes = self.net._prepare_backbone_features(out)
        return feats, pos, sizes

    def _to_output(self, low: torch.Tensor) -> List[np.ndarray]:
        h, w = self._size
        up = low if tuple(low.shape[-2:]) == (h, w) else \
            F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        return list((up[:, 0] > 0).cpu().numpy())

    def _fill_holes(self, low: torch.Tensor) -> torch.Tensor:
        # The predictor's hole filling needs SAM2's compiled CUDA kernel; without it the
        # predictor skips the step (with a warning), and so does this tracker.
        if self.fill_hole_area > 0 and _HAS_HOLE_FILLER:
            return fill_holes_in_mask_scores(low, self.fill_hole_area)
        return low

    # -- objects ------------------------------------------------------------------------------
    def add_objects(self, frame: int, image: np.ndarray, masks: Masks) -> Masks:
        """Prompt objects with masks on `frame`: they become conditioning frames. Returns SAM2's
        rendering of each prompt (its low-resolution mask, at the input size)."""
        image = self._check_image(image)
        ids = [int(o) for o in masks]
        new = [o for o in ids if o not in self._ids]
        if len(self._ids) + len(new) > self.max_objects:
            raise ValueError(f"SAM2 tracker is limited to {self.max_objects} objects (max_objects): "
                             f"{len(self._ids)} tracked, {len(new)} new")
        for oid in ids:
            m = np.asarray(masks[oid])
            if m.shape != self._size:
                raise ValueError(f"mask of object {oid} is {m.shape}, the image is {self._size}")
            if not m.any():
                raise ValueError(f"mask of object {oid} is empty")
        if not ids:
            return {}
        s = self.image_size
        with self._ctx():
            self._begin(frame, image)
            inputs = []
            for oid in ids:
                m = torch.from_numpy(np.asarray(masks[oid], dtype=bool))[None, None].float().to(self.device)
                if tuple(m.shape[-2:]) != (s, s):  # the predictor's add_new_mask resize
                    m = F.interpolate(m, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
                    m = (m >= 0.5).float()
                inputs.append(m)
            feats, pos, sizes = self._features(len(ids))
            out = self.net.track_step(
                frame_idx=frame, is_init_cond_frame=True, current_vision_feats=feats,
                current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=None,
                mask_inputs=torch.cat(inputs), output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
                num_frames=None, run_mem_encoder=False)
            low = self._fill_holes(out["pred_masks"])
            # Before propagating, the predictor encodes a prompt's memory from its (binarised)
            # low-resolution mask upsampled to SxS.
            up = F.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)
            mem = torch.where(up > 0, _MASK_LOGIT, -_MASK_LOGIT)
            shown = self._to_output(low)
        result: Masks = {}
        for k, oid in enumerate(ids):
            self._prompted[oid] = _Pred(low[k:k + 1], mem[k:k + 1], out["obj_ptr"][k:k + 1],
                                        out["object_score_logits"][k:k + 1], shown[k])
            self._preds.pop(oid, None)
            if oid not in self._ids:
                self._ids.append(oid)
            result[oid] = shown[k]
        return result

    def remove_objects(self, ids: Iterable[int]) -> None:
        for oid in [int(i) for i in ids]:
            if oid not in self._ids:
                continue
            self._ids.remove(oid)
            self._cond.pop(oid, None)
            self._preds.pop(oid, None)
            self._prompted.pop(oid, None)
            for entry in list(self._recent.values()) + list(self._bank.values()):
                entry.rows.pop(oid, None)
            for ptrs in self._ptr_ring.values():
                ptrs.pop(oid, None)
            if self.effective_memory_rule == "sam2":  # a prompt frame nobody is conditioned on
                for f in [f for f, e in self._bank.items() if not e.rows]:
                    del self._bank[f]

    # -- memory layout ------------------------------------------------------------------------
    def _stored(self, frame: int) -> Optional[_Entry]:
        return self._recent.get(frame) or self._bank.get(frame)

    def track(self, frame: int, image: np.ndarray) -> Masks:
        image = self._check_image(image)
        if not self._ids:
            return {}
        net = self.net
        with self._ctx():
            self._begin(frame, image)
            groups: "OrderedDict[tuple, List[Tuple[int, _Layout]]]" = OrderedDict()
            for oid in self._ids:
                if oid in self._prompted:
                    continue  # prompted on this frame already: the prompt is its output
                lay = self._layout(oid, frame)
                groups.setdefault(lay.key(), []).append((oid, lay))
            batches = list(groups.values())
            if self.batch_mixed_layouts and len(batches) > 1 and net.num_maskmem > 0:
                batches = [[m for members in batches for m in members]]  # one pass, keys masked
            self.last_batches = [[oid for oid, _ in members] for members in batches]
            for members in batches:
                ids = [oid for oid, _ in members]
                b = len(ids)
                feats, pos, sizes = self._features(b)
                c = net.hidden_dim
                h, w = sizes[-1]
                if net.num_maskmem == 0:
                    pix = feats[-1].permute(1, 2, 0).view(b, c, h, w)
                else:
                    layouts = [lay for _, lay in members]
                    if len({lay.key() for lay in layouts}) == 1:
                        memory, memory_pos, n_ptr = self._memory_tokens(layouts)
                        pix = net.memory_attention(curr=feats[-1:], curr_pos=pos[-1:], memory=memory,
                                                   memory_pos=memory_pos, num_obj_ptr_tokens=n_ptr)
                    else:
                        memory, memory_pos, n_ptr, keep = self._padded_memory_tokens(layouts)
                        with _masked_cross_attention(net.memory_attention, keep):
                            pix = net.memory_attention(curr=feats[-1:], curr_pos=pos[-1:], memory=memory,
                                                       memory_pos=memory_pos, num_obj_ptr_tokens=n_ptr)
                    pix = pix.permute(1, 2, 0).view(b, c, h, w)
                high_res = [x.permute(1, 2, 0).view(x.size(1), x.size(2), *s)
                            for x, s in zip(feats[:-1], sizes[:-1])] if len(feats) > 1 else None
                out = net._forward_sam_heads(backbone_features=pix, point_inputs=None, mask_inputs=None,
                                             high_res_features=high_res,
                                             multimask_output=net._use_multimask(False, None))
                _, _, _, low, high, ptr, score = out
                low = self._fill_holes(low)
                shown = self._to_output(low)
                for k, oid in enumerate(ids):
                    self._preds[oid] = _Pred(low[k:k + 1], high[k:k + 1], ptr[k:k + 1], score[k:k + 1], shown[k])
        return {oid: self._preds[oid].mask for oid in self._ids if oid in self._preds}

    def logits(self) -> Dict[int, torch.Tensor]:
        """SAM2's low-resolution mask logits (1, 1, S/4, S/4) of the current frame, per object."""
        return {oid: p.low for oid, p in {**self._preds, **self._prompted}.items()}

    def commit(self, frame: int, image: np.ndarray, masks: Masks) -> None:
        image = self._check_image(image)
        unknown = sorted(set(int(o) for o in masks) - set(self._ids))
        if unknown:
            raise ValueError(f"commit: unknown object id(s) {unknown}; tracked: {self.object_ids}")
        if self._frame != frame:
            if self._ids:
                raise ValueError(f"commit({frame}) without track({frame}) for objects {self.object_ids}")
            return
        missing = [o for o in self._ids if o not in self._prompted and o not in self._preds]
        if missing:
            raise ValueError(f"commit({frame}) without track({frame}) for objects {sorted(missing)}")
        s = self.image_size
        ids = list(self._ids)
        if not ids:  # every object was removed on this frame
            self._clear_frame()
            return
        rows_in: List[torch.Tensor] = []
        scores: List[torch.Tensor] = []
        with self._ctx():
            for oid in ids:
                pred = self._prompted.get(oid) or self._preds[oid]
                m = masks.get(oid)
                if oid in self._prompted or m is None:
                    rows_in.append(pred.mem_logits)
                    scores.append(pred.score)
                    continue
                m = np.asarray(m, dtype=bool)
                if m.shape != self._size:
                    raise ValueError(f"committed mask of object {oid} is {m.shape}, the image is {self._size}")
                if np.array_equal(m, pred.mask):  # SAM2's own prediction: its own memory
                    rows_in.append(pred.mem_logits)
                    scores.append(pred.score)
                    continue
                # Teacher forcing: the refined mask, encoded like a mask prompt (binarised at SxS).
                x = torch.from_numpy(m)[None, None].float().to(self.device)
                if tuple(x.shape[-2:]) != (s, s):
                    x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
                x = x >= 0.5
                rows_in.append(torch.where(x, _MASK_LOGIT, -_MASK_LOGIT))
                scores.append(torch.full_like(pred.score, 10.0 if bool(x.any()) else -10.0))
            feats, _, sizes = self._features(len(ids))
            maskmem, maskmem_pos = self.net._encode_new_memory(
                current_vision_feats=feats, feat_sizes=sizes, pred_masks_high_res=torch.cat(rows_in),
                object_score_logits=torch.cat(scores), is_mask_from_pts=False)
            maskmem = maskmem.to(self._memory_dtype)
            if self._mem_pos is None:
                self._mem_pos = maskmem_pos[-1][0:1].clone()
        rows = {}
        for k, oid in enumerate(ids):
            pred = self._prompted.get(oid) or self._preds[oid]
            # Own copies: a removed object's rows must not keep the whole batch allocated.
            rows[oid] = _Row(maskmem[k:k + 1].clone(), pred.ptr.clone(), oid in self._prompted)
        self._clear_frame()
        self._record(frame, rows)

    def _record(self, frame: int, rows: Dict[int, _Row]) -> None:
        """File a committed frame's rows: recent frames, pointer ring, conditioning frames."""
        entry = _Entry(frame, rows)
        ptrs: Dict[int, torch.Tensor] = {}
        for oid, row in rows.items():
            if row.cond:
                self._cond.setdefault(oid, OrderedDict())[frame] = row
            else:
                ptrs[oid] = row.ptr.clone()  # own copy: the ring's size never depends on the bank
        cond = {oid: row for oid, row in rows.items() if row.cond}
        if cond:
            # A conditioning frame is long-term memory from the start. SAM2's own rule reads
            # other objects' rows of it only while it is recent, so the bank keeps just the prompts.
            self._bank[frame] = entry if self.effective_memory_rule != "sam2" else _Entry(frame, cond)
        self._recent[frame] = entry
        self._ptr_ring[frame] = ptrs
        self._last_committed = frame
        self._prune(frame)

    def _prune(self, c: int) -> None:
        """Keep only the recent frames (and pointers) a later frame can still read."""
        if self.effective_memory_rule == "sam2":
            r, nm = self.memory_stride, self.num_maskmem
            lowest = ((c - 1) // r) * r - max(0, nm - 3) * r
            keep = {f for f in self._recent if f == c or (nm > 2 and f % r == 0 and f >= lowest)}
        else:
            keep = set(sorted(self._recent)[-self.recent_frames:])
        for f in [f for f in self._recent if f not in keep]:
            del self._recent[f]
        for f in [f for f in self._ptr_ring if f <= c - self.max_ptrs + 1]:
            del self._ptr_ring[f]

    # -- long-term memory ---------------------------------------------------------------------
    def store_memory(self, frame: int) -> None:
        if frame in self._bank or self.effective_memory_rule == "sam2":
            return  # prompt frames are held already; SAM2's own rule keeps its recent frames itself
        entry = self._recent.get(frame)
        if entry is None or frame != self._last_committed:
            raise ValueError(f"store_memory({frame}): frame {frame} is not the last committed frame "
                             f"({self._last_committed})")
        self._bank[frame] = entry

    def drop_memory(self, frame: int) -> None:
        entry = self._bank.pop(frame, None)
        if entry is None:
            if self.effective_memory_rule == "sam2" and not self._warned_ignored_drop:
                log.warning("tracker 'sam2' with memory_rule 'sam2' keeps SAM2's own recent frames: "
                            "the pipeline's smart memory has no effect (use memory_rule 'pipeline')")
                self._warned_ignored_drop = True
            return
        for oid, row in entry.rows.items():
            cond = self._cond.get(oid)
            if row.cond and cond is not None and len(cond) > 1:
                del cond[frame]
            # An object's last conditioning frame stays (SAM2 cannot track without one).

    def memory_frames(self) -> List[int]:
        held = set(self._bank)
        for cond in self._cond.values():
            held.update(cond)
        return sorted(held)

    def recent_memory_frames(self) -> List[int]:
        """The tracker's own recent frames (short-term memory), outside the pipeline's count."""
        return sorted(self._recent)

    def memory_bytes(self) -> int:
        seen = set()
        total = 0

        def add(t: Optional[torch.Tensor]) -> None:
            nonlocal total
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()

        for entry in list(self._bank.values()) + list(self._recent.values()):
            for row in entry.rows.values():
                add(row.feat)
                add(row.ptr)
        for cond in self._cond.values():
            for row in cond.values():
                add(row.feat)
                add(row.ptr)
        for ptrs in self._ptr_ring.values():
            for p in ptrs.values():
                add(p)
        add(self._mem_pos)
        return total
