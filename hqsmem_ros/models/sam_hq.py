"""SAM-HQ box refiner (the paper's HQ proposals), on the `segment-anything-hq` package.

Per frame, `set_image` runs the image encoder once through the package's own `SamPredictor`
(its ResizeLongestSide to 1024, pixel normalisation and padding), and also computes the HQ
feature map that the HQ decoder derives from the image alone (early ViT features + embedding).

`propose(boxes)` prompts the decoder with every object's box in ONE batched call of
`mask_decoder.predict_masks`, which returns the low-resolution logits of all five output
tokens (0: single-mask token, 1-3: multimask tokens, 4: HQ token) and the IoU head's
predictions for tokens 0-3. The package's predictor returns only one of these (with
multimask_output=True: the multimask token of highest predicted IoU, plus the HQ token); we keep
all three. How the three proposals of an object are formed:

- ``multimask=True`` (default; the paper's "multimask output"): proposal c (c = 0, 1, 2) comes
  from multimask token c+1, its logits being that token's logits + the HQ token's logits, the
  fusion the package applies to its single output when ``hq_token_only=False``. With
  ``hq_token_only=True`` the proposal of the token with the highest predicted IoU is the HQ
  token's logits alone (exactly what the package returns in that mode), and the other two keep
  the fused form, so the verifier still sees three distinct candidates.
- ``multimask=False``: all three slots hold the package's single-mask output (token 0 + HQ, or
  HQ alone with ``hq_token_only``), i.e. gating only decides accept/reject.

Score of proposal c = the IoU head's prediction for its token. So the proposal with the highest
score is always, bit for bit, the mask `SamPredictor.predict(box=..., multimask_output=multimask,
hq_token_only=hq_token_only)` returns. Logits are upsampled with the model's `postprocess_masks`
to the image size and thresholded at `model.mask_threshold`.

Mixed precision (``precision`` fp16/bf16): the image-sized work runs under autocast (the image
encoder, the HQ feature branch, the transformer's attention between tokens and image, the
upscaling convolutions, the mask dot products), as before. What acts on the handful of prompt and
output tokens runs in float32, autocast off: the prompt encoder (its random Fourier positional
encodings feed sin/cos arguments of up to about 20, where bf16's step is 0.06), the transformer's
token self-attention and MLP, the hypernetwork MLPs and the IoU head, and the fusion of the
tokens' logits. These tokens set the weights of every pixel's logit at once, so their rounding
moves the whole mask boundary coherently; they cost nothing next to the image-sized layers. In
fp32 these casts are no-ops (bit-identical output). Figures: docs/benchmarks.md.

Boxes are [x0, y0, x1, y1] pixels; they are clipped to the image, and a box with no area
inside the image is a ValueError naming it.

Checkpoints: the official ``sam_hq_vit_{tiny,b,l,h}.pth`` files (plain state_dicts of the whole
model) load through `checkpoints.load_state_dict` (never unpickling code) and a strict key check.
The package's own builder would use an unrestricted ``torch.load`` and ``strict=False``, so it is
always called with ``checkpoint=None``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from ..core.config import ConfigError
from ..core.interfaces import Refiner
from ..core.settings import setting
from .checkpoints import WeightSettings, apply_state_dict, autocast_context, check_precision, load_state_dict, resolve_device

with warnings.catch_warnings():
    # The package imports deprecated timm paths and re-registers timm's tiny_vit names.
    warnings.simplefilter("ignore")
    from segment_anything_hq import SamPredictor, sam_model_registry

MODEL_TYPES = ("vit_tiny", "vit_b", "vit_l", "vit_h")
# TinyViT's classifier head exists in the module but SAM never runs it; a checkpoint may omit it.
RELEASED = "from SAM-HQ's model checkpoints, github.com/SysCV/sam-hq (README)"
_OPTIONAL_KEYS = (r"image_encoder\.norm_head\..*", r"image_encoder\.head\..*")


class _Float32Forward:
    """A module's forward with autocast off and floating inputs cast to float32.

    A class rather than a closure so that a model holding it still deep-copies and pickles."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        kwargs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
        device = next((a.device for a in [*args, *kwargs.values()] if torch.is_tensor(a)), torch.device("cpu"))
        with torch.autocast(device_type=device.type, enabled=False):
            return type(self.module).forward(self.module, *args, **kwargs)


def token_path_in_float32(model) -> int:
    """Run the mask decoder's token-only layers in float32 (see the module docstring).

    Idempotent; returns how many modules run in float32."""
    dec = model.mask_decoder
    modules = [dec.iou_prediction_head, dec.hf_mlp, *dec.output_hypernetworks_mlps]
    for block in dec.transformer.layers:
        modules += [block.self_attn, block.mlp]
    for module in modules:
        if not isinstance(module.__dict__.get("forward"), _Float32Forward):
            module.forward = _Float32Forward(module)
    return len(modules)


def guess_model_type(sd) -> str:
    """A hint naming the SAM variant a state_dict looks like ('' if it cannot tell)."""
    keys = list(sd)
    if any(k.startswith("image_encoder.layers.") for k in keys):
        kind = "vit_tiny"
    else:
        blocks = {k.split(".")[2] for k in keys if k.startswith("image_encoder.blocks.")}
        kind = {12: "vit_b", 24: "vit_l", 32: "vit_h"}.get(len(blocks), "")
    if kind and not any(k.startswith("mask_decoder.hf_token") for k in keys):
        return f"It looks like an original SAM {kind} checkpoint without the HQ decoder: use sam_hq_{kind}.pth."
    return f"It looks like a SAM-HQ {kind} checkpoint." if kind else ""


@dataclass
class SamHQSettings(WeightSettings):
    model_type: str = setting("vit_tiny", "SAM-HQ image encoder (the checkpoint must hold its weights)",
                              choices=MODEL_TYPES)
    hq_token_only: bool = setting(False, "The proposal the IoU head ranks first is the HQ token's mask "
                                  "alone (false: HQ and SAM token logits fused, the package's default)")
    multimask: bool = setting(True, "Three proposals from SAM's three multimask tokens (the paper's "
                              "multimask output); false: the single-mask output in all three slots")


class SamHQRefiner(Refiner):
    name = "sam_hq"
    takes_precision = True
    Settings = SamHQSettings

    def __init__(self, model, device="cpu", precision: str = "fp32", hq_token_only: bool = False,
                 multimask: bool = True):
        self.device = torch.device(device)
        self.precision = check_precision(self.device, precision)
        # eval() after loading weights matters: TinyViT caches its attention biases in eval mode.
        self.model = model.to(self.device).eval()
        token_path_in_float32(self.model)
        self.predictor = SamPredictor(self.model)
        self.hq_token_only = bool(hq_token_only)
        self.multimask = bool(multimask)
        self._hq_features: Optional[torch.Tensor] = None

    @classmethod
    def from_config(cls, params, device: str = "auto", precision: str = "fp32") -> "SamHQRefiner":
        s = cls.parse_settings(params)
        model_type, checkpoint, sha256, seed = s.model_type, s.checkpoint, s.sha256, s.seed
        dev = resolve_device(device)
        check_precision(dev, precision)
        model_name = f"SAM-HQ {model_type}"
        if checkpoint:
            sd = load_state_dict(checkpoint, model_name, sha256,  # checked before building anything
                                 where=f"get sam_hq_{model_type}.pth {RELEASED}")
            model = sam_model_registry[model_type](checkpoint=None)
            apply_state_dict(model, sd, checkpoint, model_name, optional_missing=_OPTIONAL_KEYS,
                             hint=guess_model_type(sd))
        elif s.random_weights:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = sam_model_registry[model_type](checkpoint=None)
        else:
            raise ConfigError(f"refiner sam_hq: no checkpoint given for {model_type}; set refiner.checkpoint "
                              f"to the sam_hq_{model_type}.pth file (get it {RELEASED}), or random_weights: true for speed "
                              "benchmarks only (the masks are then meaningless)")
        return cls(model, dev, precision, hq_token_only=s.hq_token_only, multimask=s.multimask)

    # -- per frame ------------------------------------------------------------------------------

    def set_image(self, image: np.ndarray) -> None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
        with torch.inference_mode(), autocast_context(self.device, self.precision):
            self.predictor.set_image(image, image_format="RGB")
            dec = self.model.mask_decoder
            # The HQ decoder's image-only branch: the same for every box, so once per frame.
            vit_features = self.predictor.interm_features[0].permute(0, 3, 1, 2)
            self._hq_features = dec.embedding_encoder(self.predictor.features) + dec.compress_vit_feat(vit_features)

    @property
    def image_size(self) -> Tuple[int, int]:
        if not self.predictor.is_image_set:
            raise RuntimeError("set_image() must be called before propose()")
        return tuple(self.predictor.original_size)

    def _boxes_tensor(self, boxes) -> torch.Tensor:
        h, w = self.image_size
        b = np.array(boxes, dtype=np.float64, copy=True)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes must be an (N,4) array of [x0, y0, x1, y1], got shape {b.shape}")
        for i, row in enumerate(b):
            if not np.all(np.isfinite(row)):
                raise ValueError(f"box {i} {row.tolist()} has a non-finite coordinate")
        clipped = np.clip(b, 0.0, [w, h, w, h])
        for i, (row, c) in enumerate(zip(b, clipped)):
            if c[2] <= c[0] or c[3] <= c[1]:
                raise ValueError(f"box {i} {row.tolist()} has no area inside the {w}x{h} image "
                                 f"(clipped: {c.tolist()})")
        # The predictor's own coordinate transform, so boxes map exactly as in SamPredictor.predict.
        scaled = self.predictor.transform.apply_boxes(clipped, (h, w))
        return torch.as_tensor(scaled, dtype=torch.float, device=self.device)

    def propose_torch(self, boxes) -> Tuple[torch.Tensor, torch.Tensor]:
        """Like `propose`, but returns (masks (N,3,H,W) bool, scores (N,3) float32) on the device."""
        h, w = self.image_size
        box_t = self._boxes_tensor(boxes)
        n = box_t.shape[0]
        if n == 0:
            return (torch.zeros((0, 3, h, w), dtype=torch.bool, device=self.device),
                    torch.zeros((0, 3), dtype=torch.float32, device=self.device))
        with torch.inference_mode():  # the prompt encoder in float32: see the module docstring
            sparse, dense = self.model.prompt_encoder(points=None, boxes=box_t, masks=None)
            return self._decode(sparse, dense)

    def _decode(self, sparse, dense) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings of N objects -> 3 proposals each (see the module docstring)."""
        h, w = self.image_size
        n = sparse.shape[0]
        model, dec = self.model, self.model.mask_decoder
        with torch.inference_mode():
            image_pe = model.prompt_encoder.get_dense_pe()  # float32, as the prompt encoder
        with torch.inference_mode(), autocast_context(self.device, self.precision):
            logits, iou = dec.predict_masks(
                image_embeddings=self.predictor.features,
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                hq_features=self._hq_features,
            )
            logits, iou = logits.float(), iou.float()  # the tokens' logits are fused in float32
            hq_index = dec.num_mask_tokens - 1
            hq = logits[:, hq_index:hq_index + 1]
            if self.multimask:
                scores = iou[:, 1:hq_index]
                proposals = logits[:, 1:hq_index] + hq
                if self.hq_token_only:
                    best = torch.max(scores, dim=1).indices  # the package's own choice rule
                    proposals[torch.arange(n, device=proposals.device), best] = hq[:, 0]
            else:
                scores = iou[:, 0:1].expand(n, 3)
                single = hq if self.hq_token_only else logits[:, 0:1] + hq
                proposals = single.expand(n, 3, *single.shape[2:])
            masks = model.postprocess_masks(proposals, self.predictor.input_size, (h, w))
            masks = masks > model.mask_threshold
        return masks, scores

    def propose(self, boxes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        masks, scores = self.propose_torch(boxes)
        return masks.cpu().numpy(), scores.cpu().numpy()

    accepts_points = True

    def propose_points(self, points, labels, boxes) -> Tuple[np.ndarray, np.ndarray]:
        """Clicks (and optional boxes) through SAM's prompt encoder, as SamPredictor.predict
        takes point_coords/point_labels. One decoder call per kind of prompt: the encoder takes
        boxes for all objects or none, and padding a shorter click list would add tokens that
        change the masks, so objects are batched by (box or not, number of clicks)."""
        h, w = self.image_size
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        n = len(boxes)
        masks = np.zeros((n, 3, h, w), bool)
        scores = np.zeros((n, 3), np.float32)
        groups: dict = {}
        for k in range(n):
            key = (bool(np.all(np.isfinite(boxes[k]))), len(np.asarray(points[k]).reshape(-1, 2)))
            groups.setdefault(key, []).append(k)
        for (has_box, count), group in groups.items():
            coords = np.stack([self.predictor.transform.apply_coords(
                np.asarray(points[k], dtype=np.float64).reshape(-1, 2), (h, w)) for k in group])
            lbl = np.stack([np.asarray(labels[k], dtype=np.int64).reshape(-1) for k in group])
            coords_t = torch.as_tensor(coords, dtype=torch.float, device=self.device)
            lbl_t = torch.as_tensor(lbl, dtype=torch.int, device=self.device)
            box_t = self._boxes_tensor(boxes[group]) if has_box else None
            with torch.inference_mode():  # the prompt encoder in float32: see the module docstring
                sparse, dense = self.model.prompt_encoder(points=(coords_t, lbl_t), boxes=box_t, masks=None)
                m, sc = self._decode(sparse, dense)
            masks[group], scores[group] = m.cpu().numpy(), sc.cpu().numpy()
        return masks, scores
