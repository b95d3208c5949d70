"""DeAOT as the HQ-SMem base tracker, on the official implementation (the `aot` package of
`deaotpy`, BSD-3), with its long-term memory driven from outside.

How the engine keeps memory, and what this wrapper does with it:

- Long-term memory: per LSTT layer a list [K, V, ID_K (None in DeAOT), ID_V] of tensors shaped
  (tokens, 1, C); every stored frame adds enc_h * enc_w tokens and `update_long_term_memory`
  puts the newest frame first (torch.cat([new, old])). The engine's own rule writes a frame when
  frame_step - last_mem_step >= long_term_mem_gap, and `max_len_long_term` cuts the OLDEST frame
  first, which is the prompt frame. Both are switched off here: `store_memory(t)` appends the
  committed frame through the engine's own `update_long_term_memory`, `drop_memory(t)` cuts
  exactly that frame's token rows out of every tensor. The newest-first order is kept, so with
  the same frames the tensors are bit-identical to the plain engine's.
- Short-term memory: the previous frame re-encoded with its mask by `update_short_term_memory`,
  i.e. the prior y_{t-1}. `commit()` calls it with the committed (possibly refined) masks, which
  is teacher forcing (Eq. 10); its fused output is what `store_memory()` writes.
- A prompt frame is a reference frame (`add_reference_frame`: a self-matching pass with the label,
  no memory read) and is written to long-term memory at `commit`, as the official evaluator does
  when objects appear mid-video; `store_memory` of that frame is then a no-op.
- Identities: one ID bank holds MODEL_MAX_OBJ_NUM = 10 slots. More objects use more engines on
  the shared image encoding, merged by soft aggregation (the official DeAOTInferEngine's scheme);
  each further 10 objects cost one more LSTT + decoder pass. `max_objects` sets the limit.
- Removing an object frees its slot. A stored frame's ID_V is a function of the frame's label,
  so each stored frame keeps its label (at the engine's input size) and the ID branch's input;
  the frames that held the slot are re-fused with it as background, so the slot carries no trace
  of the old object and can take a new one (about 16% more memory per frame for R50-DeAOT-L).
  Other objects' entries change only on the tokens that touched the removed object.

DMAOT's VOTS weights (`r50_dm_deaotl`, `swinb_dm_deaotl`) have DeAOT's architecture and load
here; DMAOT's own per-object memory rule is not used (the pipeline decides what memory holds).
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Iterable, List, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..core.config import ConfigError
from ..core.interfaces import BaseTracker, Masks
from ..core.settings import setting
from .checkpoints import WeightSettings, apply_state_dict, check_precision, load_state_dict, resolve_device

try:
    from aot.configs.default import DefaultEngineConfig
    from aot.networks.engines.deaot_engine import DeAOTEngine
    from aot.networks.models import build_vos_model
    from aot.utils.image import one_hot_mask
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        f"the DeAOT tracker needs the 'deaotpy' package ({exc}); install it with "
        "`pip install --no-deps deaotpy` (its spatial-correlation-sampler dependency is an "
        "optional CUDA extension the engine runs without)") from exc

log = logging.getLogger(__name__)

# config name -> (deaotpy model config, what it is)
MODELS: Dict[str, Tuple[str, str]] = {
    "r50_deaotl": ("r50_deaotl", "R50-DeAOT-L"),
    "swinb_deaotl": ("swinb_deaotl", "SwinB-DeAOT-L"),
    "deaott": ("deaott", "DeAOT-T (MobileNetV2)"),
    "deaots": ("deaots", "DeAOT-S (MobileNetV2)"),
    "deaotb": ("deaotb", "DeAOT-B (MobileNetV2)"),
    "deaotl": ("deaotl", "DeAOT-L (MobileNetV2)"),
    "r50_dm_deaotl": ("r50_dm_deaotl", "R50-DMAOT weights (DeAOT-L architecture)"),
    "swinb_dm_deaotl": ("swinb_dm_deaotl", "SwinB-DMAOT weights (DeAOT-L architecture)"),
}
# Where users get the official weights (nothing is downloaded at run time).
_ZOO = "github.com/yoxu515/aot-benchmark (MODEL_ZOO.md)"
RELEASED: Dict[str, str] = {
    "r50_deaotl": f"R50_DeAOTL_PRE_YTB_DAV.pth from the AOT/DeAOT model zoo, {_ZOO}",
    "swinb_deaotl": f"SwinB_DeAOTL_PRE_YTB_DAV.pth from the AOT/DeAOT model zoo, {_ZOO}",
    "deaott": f"DeAOTT_PRE_YTB_DAV.pth from the AOT/DeAOT model zoo, {_ZOO}",
    "deaots": f"DeAOTS_PRE_YTB_DAV.pth from the AOT/DeAOT model zoo, {_ZOO}",
    "deaotb": f"DeAOTB_PRE_YTB_DAV.pth from the AOT/DeAOT model zoo, {_ZOO}",
    "deaotl": f"DeAOTL_PRE_YTB_DAV.pth from the AOT/DeAOT model zoo, {_ZOO}",
    "r50_dm_deaotl": "the R50 DMAOT weights of DMAOT's VOTS 2023 release",
    "swinb_dm_deaotl": "the SwinB DMAOT weights of DMAOT's VOTS 2023 release",
}
_REFUSED = {
    "long_term_mem_gap": "the pipeline schedules DeAOT's long-term memory: set the pipeline's "
                         "memory_interval (DeAOT's own default gap is 5 frames)",
    "max_len_long_term": "DeAOT's max_len_long_term evicts the prompt frame first; the memory "
                         "size is bounded by the pipeline's memory_capacity (smart memory)",
}
_NEVER = 1 << 62  # a long-term gap the engine never reaches: its own memory rule stays off
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_STRIDE = 16


def input_size(h: int, w: int, max_short_edge: Optional[float], max_long_edge: Optional[float],
               align_corners: bool) -> Tuple[int, int]:
    """The engine's input size for an h x w image: the official evaluation resize rule (short /
    long edge limits, then a multiple of 16, plus one when the model aligns corners)."""
    sc = 1.0
    if max_short_edge is not None and min(h, w) > max_short_edge:
        sc = float(max_short_edge) / min(h, w)
    nh, nw = sc * h, sc * w
    sc = 1.0
    if max_long_edge is not None and max(nh, nw) > max_long_edge:
        sc = float(max_long_edge) / max(nh, nw)
    nh, nw = int(sc * nh), int(sc * nw)
    off = 1 if align_corners else 0
    if (nh - off) % _STRIDE:
        nh = int(np.around((nh - off) / _STRIDE) * _STRIDE + off)
    if (nw - off) % _STRIDE:
        nw = int(np.around((nw - off) / _STRIDE) * _STRIDE + off)
    return nh, nw


def build_model(model: str, seed: int = 0):
    """The official DeAOT network for a config name, random-initialised from `seed` (CPU)."""
    if model not in MODELS:
        raise ConfigError(f"tracker 'deaot': unknown model {model!r}; available: {', '.join(MODELS)}")
    cfg = DefaultEngineConfig("hqsmem", MODELS[model][0])
    # The package prints a notice per layer when the optional correlation extension is missing.
    notices = io.StringIO()
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(notices), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(int(seed))
        net = build_vos_model(cfg.MODEL_VOS, cfg)
    if "spatial_correlation_sampler" in notices.getvalue():
        log.info("spatial-correlation-sampler is not installed: DeAOT uses its unfold-based local attention")
    return net.eval(), cfg


def _float_gate_on_cpu_autocast(net) -> int:
    """Let deaotpy's local attention run under CPU autocast (bf16).

    `local2global` index-puts the softmax gate into a float32 tensor. Under CUDA autocast softmax
    runs in float32, so the dtypes match; CPU autocast keeps it in bf16 and the index put raises
    "Index put requires the source and destination dtypes match". The gate is cast to float32
    before that call, which is what CUDA autocast does. Returns the number of layers adapted."""
    count = 0
    for module in net.modules():
        original = getattr(type(module), "local2global", None)
        if original is None:
            continue

        def local2global(local_attn, height, width, _module=module, _original=original):
            return _original(_module, local_attn.float(), height, width)

        module.local2global = local2global
        count += 1
    return count


@dataclass
class _StoredFrame:
    frame: int
    label: torch.Tensor   # (1, 1, h, w) uint8 slot label at the engine's input size
    id_inputs: list       # per layer: the ID branch's input before fusion with the label (None at layer 0)


@dataclass
class _Committed:
    frame: int
    memories: tuple       # the engine's current-frame memories fused with the committed label
    stored: _StoredFrame


class _SlotGroup:
    """One DeAOT engine: one ID bank (10 identity slots) with its own long/short-term memory."""

    def __init__(self, engine, index: int):
        self.engine = engine
        self.index = index
        self.slots: Dict[int, int] = {}          # local slot (1..10) -> object id
        self.frames: List[_StoredFrame] = []     # newest first: the engine's token order
        self.committed: Optional[_Committed] = None
        self.tracked_frame: Optional[int] = None
        self.prompted = False                    # a new or re-prompted object on the current frame

    def clear(self) -> None:
        self.engine.restart_engine()
        self.slots.clear()
        self.frames.clear()
        self.committed = None
        self.tracked_frame = None
        self.prompted = False

    @property
    def started(self) -> bool:
        return self.engine.obj_nums is not None


@dataclass
class DeAOTSettings(WeightSettings):
    REFUSED: ClassVar[Dict[str, str]] = _REFUSED
    model: str = setting("r50_deaotl", "DeAOT network (the checkpoint must hold its weights)",
                         choices=tuple(MODELS))
    max_objects: int = setting(10, "Most objects tracked at once (each 10 more cost one more LSTT and "
                               "decoder pass)", minimum=1)
    max_long_edge: Optional[float] = setting(None, "Longest image side the engine sees, pixels (unset: "
                                             "the official evaluation's)", minimum=2 * _STRIDE)
    max_short_edge: Optional[float] = setting(None, "Shortest image side the engine sees, pixels (unset: "
                                              "the official evaluation's)", minimum=2 * _STRIDE)
    short_term_mem_skip: int = setting(1, "DeAOT's short-term memory (the prior) is updated every N frames",
                                       minimum=1)


class DeAOTTracker(BaseTracker):
    """HQ-SMem's base tracker y_t = D(E(x_t); M_t; y_{t-1}) on DeAOT (see the module doc)."""

    name = "deaot"
    takes_precision = True
    Settings = DeAOTSettings

    def __init__(self, net, cfg, model: str, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
                 max_objects: Optional[int] = None, max_long_edge: Optional[float] = None,
                 max_short_edge: Optional[float] = None, short_term_mem_skip: int = 1):
        self.model = model
        self.net = net.to(device).eval()
        self.cfg = cfg
        self.device = device
        self.amp_dtype = amp_dtype
        if amp_dtype is not None and torch.device(device).type == "cpu":
            _float_gate_on_cpu_autocast(self.net)
        self.slots_per_bank = int(cfg.MODEL_MAX_OBJ_NUM)
        self.max_objects = int(max_objects) if max_objects is not None else self.slots_per_bank
        self.max_long_edge = cfg.TEST_MAX_LONG_EDGE if max_long_edge is None else float(max_long_edge)
        self.max_short_edge = cfg.TEST_MAX_SHORT_EDGE if max_short_edge is None else float(max_short_edge)
        self.short_term_mem_skip = int(short_term_mem_skip)
        n_banks = math.ceil(self.max_objects / self.slots_per_bank)
        self._groups = [_SlotGroup(self._new_engine(), k) for k in range(n_banks)]
        self.reset()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, params: Dict[str, Any], device: str = "auto", precision: str = "fp32") -> "DeAOTTracker":
        s = cls.parse_settings(params)
        model, checkpoint, seed = s.model, s.checkpoint, s.seed
        if checkpoint and s.random_weights:
            raise ConfigError("tracker 'deaot': give either checkpoint or random_weights: true, not both")
        if not checkpoint and not s.random_weights:
            raise ConfigError(
                f"tracker 'deaot': no checkpoint for model {model!r}; set checkpoint: <path to the official "
                f"{MODELS[model][1]} .pth>, get {RELEASED[model]} (random_weights: true runs untrained "
                "weights, for speed benchmarks only)")
        dev = resolve_device(device)
        amp = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[check_precision(dev, precision)]
        net, cfg = build_model(model, seed)
        if checkpoint:
            # The official files: {'state_dict': sd} (training saves, maybe with 'optimizer'),
            # {'model': sd} or sd, keys maybe prefixed 'module.'; load_state_dict unwraps them.
            sd = load_state_dict(checkpoint, expected_model=f"deaot {model}", sha256=s.sha256,
                                 where=f"get {RELEASED[model]}")
            apply_state_dict(net, sd, checkpoint, f"deaot {model}")
        else:
            log.warning("tracker 'deaot' runs %s with RANDOM weights (seed %d): masks are meaningless", model, seed)
        return cls(net, cfg, model, dev, amp, max_objects=s.max_objects, max_long_edge=s.max_long_edge,
                   max_short_edge=s.max_short_edge, short_term_mem_skip=s.short_term_mem_skip)

    def _new_engine(self):
        engine = DeAOTEngine(self.net, gpu_id=0, long_term_mem_gap=_NEVER,
                             short_term_mem_skip=self.short_term_mem_skip, max_len_long_term=_NEVER)
        return engine.eval()

    def _ctx(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.amp_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.amp_dtype))
        return stack

    # -- state --------------------------------------------------------------------------------
    def reset(self) -> None:
        for g in self._groups:
            g.clear()
        self._slot_of: Dict[int, Tuple[_SlotGroup, int]] = {}
        self._prompted_ids: List[int] = []
        self._size: Optional[Tuple[int, int]] = None
        self._input_size: Optional[Tuple[int, int]] = None
        self._enc_frame: Optional[int] = None
        self._enc = None

    @property
    def object_ids(self) -> List[int]:
        return sorted(self._slot_of)

    def _check_image(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"DeAOT expects an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
        size = image.shape[:2]
        if self._size is None:
            ih, iw = input_size(size[0], size[1], self.max_short_edge, self.max_long_edge, self.cfg.MODEL_ALIGN_CORNERS)
            if min(ih, iw) < 2 * _STRIDE:
                raise ValueError(f"image {size[1]}x{size[0]} is too small for DeAOT (engine input {iw}x{ih}, "
                                 f"needs at least {2 * _STRIDE} px per side)")
            self._size, self._input_size = size, (ih, iw)
        elif size != self._size:
            raise ValueError(f"image size changed from {self._size[1]}x{self._size[0]} to {size[1]}x{size[0]}; "
                             "reset() the tracker first")
        return image

    def _to_tensor(self, image: np.ndarray) -> torch.Tensor:
        # Same arithmetic as the official evaluation loader: float32 image, bicubic resize,
        # /255, ImageNet mean/std.
        img = image.astype(np.float32)
        ih, iw = self._input_size
        if (ih, iw) != tuple(img.shape[:2]):
            img = cv2.resize(img, dsize=(iw, ih), interpolation=cv2.INTER_CUBIC)
        img = img / 255.
        img -= _MEAN
        img /= _STD
        return torch.from_numpy(img.transpose((2, 0, 1))).unsqueeze(0).to(self.device).float()

    def _encode(self, frame: int, image: np.ndarray):
        if self._enc_frame != frame or self._enc is None:
            x = self._to_tensor(image)
            self._enc = (x, self.net.encode_image(x))
            self._enc_frame = frame
        return self._enc

    def _free_slots(self) -> List[Tuple[_SlotGroup, int]]:
        free = []
        for g in self._groups:
            top = min(self.slots_per_bank, self.max_objects - g.index * self.slots_per_bank)
            free += [(g, s) for s in range(1, top + 1) if s not in g.slots]
        return free

    # -- objects ------------------------------------------------------------------------------
    def add_objects(self, frame: int, image: np.ndarray, masks: Masks) -> None:
        image = self._check_image(image)
        new = sorted(int(o) for o in masks if int(o) not in self._slot_of)
        free = self._free_slots()
        if len(new) > len(free):
            raise ValueError(
                f"DeAOT tracks at most {self.max_objects} objects at once (max_objects; one ID bank holds "
                f"{self.slots_per_bank}): {len(self._slot_of)} tracked, {len(new)} new")
        for oid, m in masks.items():
            m = np.asarray(m)
            if m.shape != self._size:
                raise ValueError(f"mask of object {oid} is {m.shape}, the image is {self._size}")
            if not m.any():
                raise ValueError(f"mask of object {oid} is empty")
        for oid, (g, slot) in zip(new, free):
            g.slots[slot] = oid
            self._slot_of[oid] = (g, slot)
        for oid in masks:
            g, _ = self._slot_of[int(oid)]
            g.prompted = True
            if int(oid) not in self._prompted_ids:
                self._prompted_ids.append(int(oid))

    def remove_objects(self, ids: Iterable[int]) -> None:
        for oid in ids:
            entry = self._slot_of.pop(int(oid), None)
            if entry is None:
                continue
            g, slot = entry
            del g.slots[slot]
            if int(oid) in self._prompted_ids:
                self._prompted_ids.remove(int(oid))
            if not g.slots:
                g.clear()  # nothing left in this ID bank: free its whole memory
            else:
                with self._ctx():
                    self._forget_slot(g, slot)

    def _forget_slot(self, g: _SlotGroup, slot: int) -> None:
        """Re-fuse every stored frame that holds `slot` (and the committed frame, which a later
        store_memory writes) with that slot as background."""
        eng = g.engine
        hw = eng.enc_hw
        todo = list(g.frames)
        if g.committed is not None and all(sf is not g.committed.stored for sf in todo):
            todo.append(g.committed.stored)
        for sf in todo:
            hit = sf.label == slot
            if not bool(hit.any()):
                continue
            sf.label = sf.label.masked_fill(hit, 0)
            id_emb = eng.assign_identity(one_hot_mask(sf.label.float(), eng.max_obj_num))
            fused = [layer.fuse_key_value_id(None, sf.id_inputs[k], id_emb)[1]
                     for k, layer in enumerate(eng.AOT.LSTT.layers)]
            i = next((k for k, x in enumerate(g.frames) if x is sf), None)
            if i is not None:
                for k, mem in enumerate(eng.long_term_memories):
                    old = mem[3]
                    mem[3] = torch.cat([old[:i * hw], fused[k].to(old.dtype), old[(i + 1) * hw:]], dim=0)
            if g.committed is not None and g.committed.stored is sf:
                for k, mem in enumerate(g.committed.memories):
                    mem[3] = fused[k]

    @staticmethod
    def _release_read_memory(g: _SlotGroup) -> None:
        # The engine keeps the long-term tensors it just read in curr_lstt_output[2] and never
        # uses them again; without this a dropped frame would stay allocated until the next frame.
        out = g.engine.curr_lstt_output
        g.engine.curr_lstt_output = (out[0], out[1], None, out[3])

    # -- per frame ----------------------------------------------------------------------------
    def track(self, frame: int, image: np.ndarray) -> Masks:
        image = self._check_image(image)
        active = [g for g in self._groups if g.slots and g.started]
        if not active:
            return {}
        h, w = self._size
        with self._ctx():
            _, enc = self._encode(frame, image)
            logits = []
            for g in active:
                g.engine.match_propogate_one_frame(img_embs=enc)
                self._release_read_memory(g)
                g.tracked_frame = frame
                lg = g.engine.decode_current_logits((h, w))
                unused = [s for s in range(1, g.engine.obj_nums[0] + 1) if s not in g.slots]
                if unused:  # freed slots: same treatment the engine gives slots above obj_nums
                    lg[:, unused] = -1e10 if lg.dtype == torch.float32 else -1e4
                logits.append(lg)
            if len(logits) == 1:
                merged = logits[0]
            else:  # the official soft aggregation over ID banks
                probs = [torch.softmax(lg, dim=1) for lg in logits]
                bg = torch.prod(torch.cat([p[:, :1] for p in probs], dim=1), dim=1, keepdim=True)
                fg = [p[:, 1:1 + self.slots_per_bank] for p in probs]
                merged = torch.logit(torch.cat([bg] + fg, dim=1).clamp(1e-5, 1 - 1e-5))
            label = torch.argmax(torch.softmax(merged.float(), dim=1), dim=1)[0].cpu().numpy()
        out: Masks = {}
        for oid, (g, slot) in self._slot_of.items():
            if g.started:
                channel = active.index(g) * self.slots_per_bank + slot if len(active) > 1 else slot
                out[oid] = label == channel
        return out

    def commit(self, frame: int, image: np.ndarray, masks: Masks) -> None:
        image = self._check_image(image)
        unknown = sorted(set(int(o) for o in masks) - set(self._slot_of))
        if unknown:
            raise ValueError(f"commit: unknown object id(s) {unknown}; tracked: {self.object_ids}")
        # One label map; prompted objects are painted last so a prompt wins over a tracked mask.
        label = np.zeros(self._size, np.int64)
        order = [o for o in sorted(self._slot_of) if o not in self._prompted_ids] + self._prompted_ids
        for oid in order:
            m = masks.get(oid)
            if m is None:
                continue
            m = np.asarray(m, dtype=bool)
            if m.shape != self._size:
                raise ValueError(f"committed mask of object {oid} is {m.shape}, the image is {self._size}")
            g, slot = self._slot_of[oid]
            label[m] = g.index * self.slots_per_bank + slot
        for g in self._groups:
            if g.slots and not g.prompted and g.tracked_frame != frame:
                raise ValueError(f"commit({frame}) without track({frame}) for objects {sorted(g.slots.values())}")
        with self._ctx():
            x, enc = self._encode(frame, image)
            full = torch.from_numpy(label).to(self.device).float()[None, None]
            full = F.interpolate(full, size=self._input_size, mode="nearest")
            for g in self._groups:
                if not g.slots:
                    continue
                lo = g.index * self.slots_per_bank + 1
                inside = ((full >= lo) & (full <= lo + self.slots_per_bank - 1)).float()
                local = (inside * full - lo + 1) * inside
                local_u8 = local.to(torch.uint8)
                eng = g.engine
                if g.prompted or not g.started:
                    # A reference frame; the engine writes it into long-term memory now.
                    eng.add_reference_frame(x, local, obj_nums=[max(g.slots)], img_embs=enc)
                    self._release_read_memory(g)
                    ids_in = [mem[3] for mem in eng.curr_lstt_output[1]]
                    g.frames.insert(0, _StoredFrame(frame, local_u8, ids_in))
                    g.committed = None
                    g.prompted = False
                else:
                    mems = eng.curr_lstt_output[1]
                    ids_in = [mem[3] for mem in mems]
                    eng.update_short_term_memory(local, skip_long_term_update=True)
                    g.committed = _Committed(frame, mems, _StoredFrame(frame, local_u8, ids_in))
        self._prompted_ids = []

    # -- long-term memory ---------------------------------------------------------------------
    def store_memory(self, frame: int) -> None:
        todo = []
        for g in self._groups:
            if not g.slots or any(sf.frame == frame for sf in g.frames):
                continue
            if g.committed is None or g.committed.frame != frame:
                raise ValueError(f"store_memory({frame}): frame {frame} is not the last committed frame")
            todo.append(g)
        with self._ctx():
            for g in todo:
                g.engine.update_long_term_memory(g.committed.memories)
                g.frames.insert(0, g.committed.stored)

    def drop_memory(self, frame: int) -> None:
        """Cut the frame's token rows out of every long-term tensor (a frame not held is ignored).

        An empty long-term memory is allowed for a moment (smart memory drops before it stores);
        tracking with it reads the short-term memory only.
        """
        with self._ctx():
            for g in self._groups:
                i = next((k for k, sf in enumerate(g.frames) if sf.frame == frame), None)
                if i is None:
                    continue
                hw = g.engine.enc_hw
                g.engine.long_term_memories = [
                    [None if e is None else torch.cat([e[:i * hw], e[(i + 1) * hw:]], dim=0) for e in mem]
                    for mem in g.engine.long_term_memories]
                del g.frames[i]

    def memory_frames(self) -> List[int]:
        return sorted({sf.frame for g in self._groups for sf in g.frames})

    def memory_bytes(self) -> int:
        total = 0
        for g in self._groups:
            for mem in g.engine.long_term_memories or ():
                total += sum(e.numel() * e.element_size() for e in mem if e is not None)
            for sf in g.frames:
                total += sf.label.numel() * sf.label.element_size()
                total += sum(t.numel() * t.element_size() for t in sf.id_inputs if t is not None)
        return total

    def memory_tokens(self) -> int:
        """Token rows in the first ID bank's long-term memory (frames x enc_h x enc_w)."""
        mem = self._groups[0].engine.long_term_memories
        return 0 if not mem else int(mem[0][0].shape[0])
