"""SAM 2.1 for the streaming tracker (hqsmem_ros/models/sam2_tracker.py): the model catalogue
and builder, the per-object memory records, and the assembly of the memory tokens the memory
attention reads (a mixin of SAM2Tracker)."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..core.config import ConfigError

try:
    from sam2.build_sam import build_sam2_video_predictor
    from sam2.modeling.position_encoding import apply_rotary_enc
    from sam2.modeling.sam2_utils import get_1d_sine_pe, select_closest_cond_frames
    from sam2.utils.misc import fill_holes_in_mask_scores
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        f"the SAM2 tracker needs the 'sam2' package ({exc}); install it with `pip install "
        "'hydra-core>=1.3.2' 'iopath>=0.1.10'` then `SAM2_BUILD_CUDA=0 pip install --no-deps "
        "--no-build-isolation sam2==1.1.0` (as scripts/setup_venv.sh does)") from exc


# config name -> (sam2 hydra config, what it is, official checkpoint file name)
RELEASED = "from github.com/facebookresearch/sam2 (checkpoints/download_ckpts.sh lists the files)"
MODELS: Dict[str, Tuple[str, str, str]] = {
    "sam2.1_hiera_tiny": ("configs/sam2.1/sam2.1_hiera_t.yaml", "SAM 2.1 Hiera-T", "sam2.1_hiera_tiny.pt"),
    "sam2.1_hiera_small": ("configs/sam2.1/sam2.1_hiera_s.yaml", "SAM 2.1 Hiera-S", "sam2.1_hiera_small.pt"),
    "sam2.1_hiera_base_plus": ("configs/sam2.1/sam2.1_hiera_b+.yaml", "SAM 2.1 Hiera-B+", "sam2.1_hiera_base_plus.pt"),
    "sam2.1_hiera_large": ("configs/sam2.1/sam2.1_hiera_l.yaml", "SAM 2.1 Hiera-L", "sam2.1_hiera_large.pt"),
}
ALIASES = {"tiny": "sam2.1_hiera_tiny", "t": "sam2.1_hiera_tiny", "small": "sam2.1_hiera_small",
           "s": "sam2.1_hiera_small", "base_plus": "sam2.1_hiera_base_plus", "b+": "sam2.1_hiera_base_plus",
           "large": "sam2.1_hiera_large", "l": "sam2.1_hiera_large"}
def resolve_model(model: str) -> str:
    name = ALIASES.get(model, model)
    if name not in MODELS:
        raise ConfigError(f"tracker 'sam2': unknown model {model!r}; available: "
                          f"{', '.join(MODELS)} (or {', '.join(ALIASES)})")
    return name


def build_model(model: str, image_size: Optional[int] = None, seed: int = 0, overrides: Sequence[str] = ()):
    """SAM2's video-predictor network for a config name on the CPU, random-initialised from `seed`,
    with the predictor's own post-processing settings. `image_size` (a multiple of 32) overrides
    the config's 1024; `overrides` are extra hydra overrides (tests use them to shrink the model)."""
    name = resolve_model(model)
    extra = list(overrides)
    if image_size is not None:
        extra.append(f"++model.image_size={int(image_size)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = build_sam2_video_predictor(MODELS[name][0], ckpt_path=None, device="cpu", mode="eval",
                                         hydra_overrides_extra=extra)
    return net


@dataclass
class _Row:
    """One object's memory from one frame."""
    feat: torch.Tensor   # (1, mem_dim, h, w) maskmem_features, bfloat16 (float16 in fp16)
    ptr: torch.Tensor    # (1, hidden_dim) object pointer
    cond: bool           # a conditioning (prompt) frame for this object


@dataclass
class _Entry:
    frame: int
    rows: Dict[int, _Row]


@dataclass
class _Pred:
    """SAM2's output for one object on the current frame (freed at commit)."""
    low: torch.Tensor          # (1, 1, S/4, S/4) mask logits (after hole filling)
    mem_logits: torch.Tensor   # (1, 1, S, S) what the memory encoder reads
    ptr: torch.Tensor          # (1, hidden_dim)
    score: torch.Tensor        # (1, 1) object score logit
    mask: np.ndarray           # bool at the input size: what track()/add_objects() returned


@dataclass
class _Layout:
    cond: List[_Row]
    spatial: List[Tuple[int, _Row]]      # (t_pos, row), oldest first
    ptrs: List[Tuple[int, torch.Tensor]]  # (temporal distance, pointer)

    def key(self):
        return len(self.cond), tuple(t for t, _ in self.spatial), len(self.ptrs)


@contextlib.contextmanager
def _masked_cross_attention(memory_attention, keep: torch.Tensor):
    """While active, the memory-attention layers' cross-attention ignores the keys where `keep`
    (B, L) is False (padding of objects whose memory is shorter). SAM2's attention blocks take
    no key mask, so their forward is shadowed per instance by one that does the same projections
    and rotary encoding with the blocks' own weights, then masked attention."""
    mask = keep[:, None, None, :]  # broadcast over heads and queries

    def masked_forward(attn):
        def forward(q, k, v, num_k_exclude_rope: int = 0):
            q = attn._separate_heads(attn.q_proj(q), attn.num_heads)
            k = attn._separate_heads(attn.k_proj(k), attn.num_heads)
            v = attn._separate_heads(attn.v_proj(v), attn.num_heads)
            side = math.sqrt(q.shape[-2])
            if attn.freqs_cis.shape[0] != q.shape[-2]:
                attn.freqs_cis = attn.compute_cis(end_x=side, end_y=side)
            attn.freqs_cis = attn.freqs_cis.to(q.device)
            n_rope = k.shape[-2] - num_k_exclude_rope
            q, k_rope = apply_rotary_enc(q, k[:, :, :n_rope], freqs_cis=attn.freqs_cis,
                                         repeat_freqs_k=attn.rope_k_repeat)
            k = torch.cat([k_rope, k[:, :, n_rope:]], dim=2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return attn.out_proj(attn._recombine_heads(out))
        return forward

    blocks = [layer.cross_attn_image for layer in memory_attention.layers]
    for attn in blocks:
        attn.forward = masked_forward(attn)
    try:
        yield
    finally:
        for attn in blocks:
            del attn.forward


class MemoryTokens:
    """SAM2Tracker's memory-token assembly (which rows each object reads, and their tokens)."""

    def _layout(self, oid: int, t: int) -> _Layout:
        """What object `oid` reads on frame t, in SAM2's token order (see _prepare_memory_conditioned_features)."""
        net = self.net
        cond_all = self._cond[oid]
        selected, unselected = select_closest_cond_frames(t, cond_all, net.max_cond_frames_in_attn)
        cond = list(selected.values())
        spatial: List[Tuple[int, _Row]] = []
        nm = self.num_maskmem
        if self.effective_memory_rule == "sam2":
            r = self.memory_stride
            for t_pos in range(1, nm):
                t_rel = nm - t_pos
                f = t - 1 if t_rel == 1 else ((t - 2) // r) * r - (t_rel - 2) * r
                entry = self._stored(f)
                row = entry.rows.get(oid) if entry is not None else None
                if row is None or row.cond:
                    row = unselected.get(f)
                if row is not None:
                    spatial.append((t_pos, row))
        else:
            frames = sorted(set(self._recent) | set(self._bank), reverse=True)
            rows = []
            for f in frames:
                row = self._stored(f).rows.get(oid)
                if row is not None and not row.cond:
                    rows.append(row)
            for rank, row in enumerate(rows):
                spatial.append((max(1, nm - 1 - rank), row))
            spatial.reverse()  # SAM2 concatenates the oldest slot first
        ptrs: List[Tuple[int, torch.Tensor]] = []
        if net.use_obj_ptrs_in_encoder:
            for c, row in selected.items():
                if net.only_obj_ptrs_in_the_past_for_eval and c > t:
                    continue
                ptrs.append((t - c if net.use_signed_tpos_enc_to_obj_ptrs else abs(t - c), row.ptr))
            for t_diff in range(1, self.max_ptrs):
                f = t - t_diff
                if f < 0:
                    break
                ptr = self._ptr_ring.get(f, {}).get(oid)
                if ptr is None and f in unselected:
                    ptr = unselected[f].ptr
                if ptr is not None:
                    ptrs.append((t_diff, ptr))
        return _Layout(cond, spatial, ptrs)

    def _memory_tokens(self, layouts: List[_Layout]):
        """Memory tokens and their positions for a batch of objects with one layout key."""
        net = self.net
        b = len(layouts)
        dev = self.device
        nm = self.num_maskmem
        mem, mem_pos = [], []
        blocks = [[(0, row) for row in lay.cond] + lay.spatial for lay in layouts]
        for k in range(len(blocks[0])):
            t_pos = blocks[0][k][0]
            feats = torch.cat([blk[k][1].feat for blk in blocks]).to(dev, non_blocking=True)
            mem.append(feats.flatten(2).permute(2, 0, 1))
            enc = self._mem_pos.expand(b, -1, -1, -1).flatten(2).permute(2, 0, 1)
            mem_pos.append(enc + net.maskmem_tpos_enc[nm - t_pos - 1])
        n_ptr_tokens = 0
        n = len(layouts[0].ptrs)
        if n:
            c = net.hidden_dim
            obj_ptrs = torch.stack([torch.cat([lay.ptrs[j][1] for lay in layouts]) for j in range(n)])
            positions = [tuple(d for d, _ in lay.ptrs) for lay in layouts]
            if net.add_tpos_enc_to_obj_ptrs:
                t_diff_max = self.max_ptrs - 1
                tpos_dim = c if net.proj_tpos_enc_in_obj_ptrs else net.mem_dim

                def encode(pos_list):
                    pos = torch.tensor(pos_list).to(device=dev, non_blocking=True)
                    return net.obj_ptr_tpos_proj(get_1d_sine_pe(pos / t_diff_max, dim=tpos_dim))

                if len(set(positions)) == 1:  # the common case, computed exactly as SAM2 does
                    obj_pos = encode(positions[0]).unsqueeze(1).expand(-1, b, net.mem_dim)
                else:
                    obj_pos = torch.stack([encode(p) for p in positions], dim=1)
            else:
                obj_pos = obj_ptrs.new_zeros(n, b, net.mem_dim)
            if net.mem_dim < c:  # one pointer -> C / mem_dim tokens
                obj_ptrs = obj_ptrs.reshape(-1, b, c // net.mem_dim, net.mem_dim)
                obj_ptrs = obj_ptrs.permute(0, 2, 1, 3).flatten(0, 1)
                obj_pos = obj_pos.repeat_interleave(c // net.mem_dim, dim=0)
            mem.append(obj_ptrs)
            mem_pos.append(obj_pos)
            n_ptr_tokens = obj_ptrs.shape[0]
        return torch.cat(mem, dim=0), torch.cat(mem_pos, dim=0), n_ptr_tokens

    def _padded_memory_tokens(self, layouts: List[_Layout]):
        """Memory of objects with different layouts in one batch: each object's tokens exactly as
        its own pass builds them, the spatial part and the pointer part each padded to the
        longest, and a (B, L) mask of the real keys. Padding the spatial part by whole frames
        keeps SAM2's rotary encoding (repeated every frame's worth of tokens) in place."""
        parts = [self._memory_tokens([lay]) for lay in layouts]
        spatial = [m.shape[0] - n for m, _, n in parts]
        n_sp, n_ptr = max(spatial), max(n for _, _, n in parts)
        first = parts[0][0]
        b, dim = len(parts), first.shape[-1]
        memory = first.new_zeros(n_sp + n_ptr, b, dim)
        memory_pos = first.new_zeros(n_sp + n_ptr, b, dim)
        keep = torch.zeros(b, n_sp + n_ptr, dtype=torch.bool, device=first.device)
        for k, ((m, p, n), sp) in enumerate(zip(parts, spatial)):
            memory[:sp, k], memory_pos[:sp, k] = m[:sp, 0], p[:sp, 0]
            memory[n_sp:n_sp + n, k], memory_pos[n_sp:n_sp + n, k] = m[sp:, 0], p[sp:, 0]
            keep[k, :sp] = True
            keep[k, n_sp:n_sp + n] = True
        return memory, memory_pos, n_ptr, keep

    # -- per frame ----------------------------------------------------------------------------
