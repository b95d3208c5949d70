"""DINO / DINOv2 appearance features phi(x, m) for verification (Eq. 8-9) and smart memory.

The backbone is a timm VisionTransformer built with ``pretrained=False`` (nothing is ever
downloaded) and ``dynamic_img_size=True``, so one forward pass per frame handles any aspect ratio:
the frame is resized so that its short side is ``input_size`` (rounded to a multiple of the
patch size; the long side keeps the aspect ratio, rounded the same way), normalised with the
model's mean/std, and run through timm's modules to the final norm. The patch tokens are kept
as an (h, w, C) map.

Position embeddings at a grid other than the trained one are resampled as the official
facebookresearch DINO and DINOv2 code does it, not as timm does (timm asks for the exact output
size with antialiasing, which gives other tokens): the M x M patch embedding is interpolated
bicubically (no antialias, half-pixel centres) with scale factors ((h + 0.1) / M, (w + 0.1) / M),
so the output is h x w and the sampling positions follow the scale factor, not h / M. The class
token's embedding is not resampled; at the trained grid the embedding is used as it is. The
resampled embedding is computed once per grid and cached (`official_pos_embed`).

`embed(masks)` pools that map under every mask in one batched operation. Patch (i, j) covers
rows [i H/h, (i+1) H/h) and columns [j W/w, (j+1) W/w) of the H x W frame (its pixels before the
resize); its weight is the exact fraction of that rectangle covered by the mask, each pixel a
unit square (separable: two products with the row and column overlap matrices, cached per
frame size). The weighted mean of the patch tokens is taken and L2-normalised. An empty mask gives an
all-zero row.

Models: any timm VisionTransformer name, plus the official hub names as aliases
(``dino_vits16`` -> ``vit_small_patch16_224.dino``, ``dinov2_vits14`` ->
``vit_small_patch14_dinov2.lvd142m``, ...; see `ALIASES`).

Checkpoint layouts accepted (after `checkpoints.load_state_dict`'s unwrapping):
- timm's own layout (``model.state_dict()`` of the timm model);
- the official facebookresearch layouts: DINO's released backbone weights
  (``dino_deitsmall16_pretrain.pth`` ...) already use timm's key names; DINOv2's
  (``dinov2_vits14_pretrain.pth`` ...) carry ``mask_token``, ``register_tokens`` and, for ViT-g,
  SwiGLU ``w12``/``w3`` names, which timm's ``checkpoint_filter_fn`` remaps (it also resamples a
  position embedding trained at another resolution).
DINO's full training checkpoints (``teacher``/``student`` with ``backbone.`` prefixes) are not
accepted: extract the teacher backbone first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..core.config import ConfigError
from ..core.interfaces import FeatureExtractor
from ..core.settings import setting
from .checkpoints import WeightSettings, apply_state_dict, autocast_context, check_precision, load_state_dict, resolve_device

ALIASES = {
    "dino_vits16": "vit_small_patch16_224.dino",
    "dino_vits8": "vit_small_patch8_224.dino",
    "dino_vitb16": "vit_base_patch16_224.dino",
    "dino_vitb8": "vit_base_patch8_224.dino",
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2.lvd142m",
}


def released(model_name: str) -> str:
    """Which official file a model name needs and where users get it (for the errors)."""
    name = ALIASES.get(model_name, model_name)
    if "dinov2" in name:
        size = {"small": "s", "base": "b", "large": "l", "giant": "g"}.get(name.split("_")[1], "s")
        reg = "_reg4" if "_reg" in name else ""
        return (f"get dinov2_vit{size}14{reg}_pretrain.pth (backbone only) from "
                "github.com/facebookresearch/dinov2 (README, pretrained models)")
    if name.endswith(".dino"):
        return "get the backbone-only file (e.g. dino_deitsmall16_pretrain.pth) from github.com/facebookresearch/dino (README)"
    return "any timm VisionTransformer state_dict of this architecture"


def build_backbone(model_name: str):
    """The timm ViT for `model_name` (an alias or a timm name), random weights, no download."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    name = ALIASES.get(model_name, model_name)
    if not timm.is_model(name):
        raise ConfigError(f"features dino: unknown model_name {model_name!r}; use one of "
                          f"{', '.join(ALIASES)} or a timm VisionTransformer name")
    try:
        model = timm.create_model(name, pretrained=False, dynamic_img_size=True, num_classes=0)
    except TypeError as exc:  # other architectures do not take dynamic_img_size
        raise ConfigError(f"features dino: {model_name!r} is not a timm VisionTransformer ({exc})") from exc
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"features dino: {model_name!r} is not a timm VisionTransformer")
    return model.eval()


def official_pos_embed(patch_pos: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(1, M*M, C) patch position embeddings of the trained M x M grid -> (1, h*w, C) for `grid`
    (h, w), with the official DINO/DINOv2 arithmetic (see the module docstring)."""
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"position embedding of {n} patches is not a square grid")
    h, w = int(grid[0]), int(grid[1])
    if (h, w) == (side, side):
        return patch_pos
    square = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    out = F.interpolate(square, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic",
                        align_corners=False, recompute_scale_factor=False)
    if tuple(out.shape[-2:]) != (h, w):  # cannot happen for h, w >= 1; the official code asserts it too
        raise RuntimeError(f"position embedding resampled to {tuple(out.shape[-2:])}, expected {(h, w)}")
    return out.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(patch_pos.dtype)


def _overlap_matrix(pixels: int, cells: int, device) -> torch.Tensor:
    """(cells, pixels): the length of pixel p's unit interval inside cell c's interval
    [c * pixels / cells, (c + 1) * pixels / cells), divided by that cell's length."""
    edges = torch.arange(cells + 1, dtype=torch.float64) * (pixels / cells)
    lo, hi = edges[:-1, None], edges[1:, None]
    p = torch.arange(pixels, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(hi, p + 1) - torch.maximum(lo, p)).clamp_min(0)
    return (overlap / (pixels / cells)).to(device=device, dtype=torch.float32)


def grid_size(height: int, width: int, input_size: int, patch: int) -> Tuple[int, int]:
    """Patch grid (rows, cols) for a frame: short side -> input_size, both rounded to patches."""
    scale = input_size / min(height, width)
    return max(1, round(height * scale / patch)), max(1, round(width * scale / patch))


@dataclass
class DinoSettings(WeightSettings):
    model_name: str = setting("dinov2_vits14", f"ViT backbone: {', '.join(ALIASES)}, or a timm "
                              "VisionTransformer name (the checkpoint must hold its weights)")
    input_size: int = setting(448, "The frame's short side is resized to this (pixels) before the "
                              "backbone", minimum=14)


class DinoFeatureExtractor(FeatureExtractor):
    name = "dino"
    takes_precision = True
    Settings = DinoSettings

    def __init__(self, model, input_size: int = 448, device="cpu", precision: str = "fp32",
                 model_name: str = "dino"):
        self.device = torch.device(device)
        self.precision = check_precision(self.device, precision)
        self.model = model.to(self.device).eval()
        self.model_name = model_name
        self.input_size = int(input_size)
        self.patch = int(self.model.patch_embed.patch_size[0])
        cfg = self.model.pretrained_cfg
        self._mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)
        self._interp = cfg.get("interpolation", "bicubic")
        if getattr(self.model, "pos_embed", None) is None or getattr(self.model, "rope", None) is not None:
            raise ConfigError(f"features dino: {model_name!r} has no learned absolute position embedding")
        # The official code resamples the patch part only: timm keeps the class token's entry in
        # pos_embed unless no_embed_class (DINOv2 with registers: folded into cls_token on load).
        self._pos_prefix = 0 if self.model.no_embed_class else int(self.model.num_prefix_tokens)
        self._pos_cache: Dict[Tuple[int, int], torch.Tensor] = {}
        self._pool_cache: Dict[Tuple[int, int, int, int], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._tokens = None
        self._shape = None

    @classmethod
    def from_config(cls, params, device: str = "auto", precision: str = "fp32") -> "DinoFeatureExtractor":
        s = cls.parse_settings(params)
        model_name, checkpoint, sha256, input_size = s.model_name, s.checkpoint, s.sha256, s.input_size
        dev = resolve_device(device)
        check_precision(dev, precision)
        if checkpoint:
            sd = load_state_dict(checkpoint, model_name, sha256, where=released(model_name))  # checked first
            model = build_backbone(model_name)
            from timm.models.vision_transformer import checkpoint_filter_fn
            try:
                sd = checkpoint_filter_fn(sd, model)
            except Exception as exc:  # remapping failed: the layout is not one timm knows
                raise ConfigError(f"features dino: checkpoint {str(checkpoint)!r} for {model_name} could not be "
                                  f"mapped to timm's layout ({type(exc).__name__}: {exc})") from exc
            apply_state_dict(model, sd, checkpoint, model_name)
        elif s.random_weights:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s.seed)
                model = build_backbone(model_name)
        else:
            raise ConfigError(f"features dino: no checkpoint given for {model_name}; set features.checkpoint "
                              f"({released(model_name)}), or random_weights: true for speed benchmarks only (features are then meaningless)")
        return cls(model, input_size=input_size, device=dev, precision=precision, model_name=model_name)

    @property
    def dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def token_map(self) -> torch.Tensor:
        """(h, w, C) float32 patch tokens of the current frame."""
        if self._tokens is None:
            raise RuntimeError("set_image() must be called before embed()")
        return self._tokens

    def pos_embed_for(self, grid: Tuple[int, int]) -> torch.Tensor:
        """The position embedding added to the tokens at patch grid (h, w): (1, prefix + h*w, C)."""
        grid = (int(grid[0]), int(grid[1]))
        cached = self._pos_cache.get(grid)
        if cached is None:
            pos = self.model.pos_embed.detach()
            patches = official_pos_embed(pos[:, self._pos_prefix:], grid)
            cached = torch.cat([pos[:, :self._pos_prefix], patches], dim=1)
            self._pos_cache = {grid: cached}  # one camera, one grid: keep only the latest
        return cached

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """timm's forward_features with the official position-embedding resampling: (B, T, C)."""
        m = self.model
        x = m.patch_embed(x)  # (B, h, w, C): dynamic_img_size keeps the grid
        b, gh, gw, c = x.shape
        x = x.reshape(b, gh * gw, c)
        pos = self.pos_embed_for((gh, gw)).to(x.dtype)
        prefix = [t.expand(b, -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        if m.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        x = m.norm_pre(m.patch_drop(m.pos_drop(x)))
        return m.norm(m.blocks(x))

    def set_image(self, image: np.ndarray) -> None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
        h, w = image.shape[:2]
        gh, gw = grid_size(h, w, self.input_size, self.patch)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
            x = x.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
            size = (gh * self.patch, gw * self.patch)
            if (h, w) != size:
                x = F.interpolate(x, size=size, mode=self._interp, align_corners=False, antialias=True)
            x = (x - self._mean) / self._std
            with autocast_context(self.device, self.precision):
                tokens = self.forward_tokens(x)
            patches = tokens[0, self.model.num_prefix_tokens:].float()
            self._tokens = patches.reshape(gh, gw, -1)
        self._shape = (h, w)

    def pool_weights(self, masks) -> torch.Tensor:
        """(M,H,W) masks -> (M, h*w) patch weights: the fraction of each patch's footprint in the
        frame covered by the mask (exact, see the module docstring)."""
        if self._tokens is None:
            raise RuntimeError("set_image() must be called before embed()")
        m = masks if isinstance(masks, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(masks, dtype=bool))
        if m.ndim != 3 or tuple(m.shape[1:]) != self._shape:
            raise ValueError(f"masks must be (M,{self._shape[0]},{self._shape[1]}), got {tuple(m.shape)}")
        gh, gw = self._tokens.shape[:2]
        h, w = self._shape
        key = (h, w, gh, gw)
        mats = self._pool_cache.get(key)
        if mats is None:
            mats = (_overlap_matrix(h, gh, self.device), _overlap_matrix(w, gw, self.device).T.contiguous())
            self._pool_cache = {key: mats}
        rows, cols = mats
        m = m.to(self.device, non_blocking=True).float()
        return (rows @ (m @ cols)).flatten(1)

    def embed_torch(self, masks) -> torch.Tensor:
        """Like `embed`, on the device: (M, D) float32."""
        tokens = self.token_map
        with torch.inference_mode():
            weights = self.pool_weights(masks)
            if weights.shape[0] == 0:
                return torch.zeros((0, tokens.shape[-1]), dtype=torch.float32, device=self.device)
            total = weights.sum(dim=1, keepdim=True)
            pooled = (weights @ tokens.reshape(-1, tokens.shape[-1])) / total.clamp_min(1e-12)
            norm = pooled.norm(dim=1, keepdim=True)
            return torch.where((total > 0) & (norm > 0), pooled / norm.clamp_min(1e-12), torch.zeros_like(pooled))

    def embed(self, masks: np.ndarray) -> np.ndarray:
        return self.embed_torch(masks).cpu().numpy().astype(np.float32, copy=False)
