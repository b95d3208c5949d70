"""SAM-HQ mixed precision by stage (issue 14): which part's rounding moves the mask boundary.

On a small synthetic frame (96x128, two boxes; the scene of test/test_precision.py) and random
weights, the refiner's proposals in fp32 are the reference. Then: the whole model in the low
precision as shipped (prompt encoder and token path in float32, see models/sam_hq.py); with the
token path under autocast; with both under autocast (as before that change); and each stage ALONE in the low precision
inside an otherwise fp32 model, its output cast back to float32. Printed per row: the IoU of each
of the 6 proposals against fp32 (min, mean) and the relative L2 error of the image-size logits.

    python -m hqsmem_ros.tools.precision_stages --model vit_tiny --device cpu --low bf16

fp16 on the CPU is refused unless HQSMEM_CPU_FP16=1 (models/checkpoints.py): torch emulates it on
most CPUs, so it is slow, but its rounding is fp16's. `--rows shipped` runs only the shipped row
(vit_b in emulated fp16 takes minutes per row); `--rows encoder` adds, after it, each part of the
image encoder alone in the low precision (its stages, and its attention linears, MLPs and local
convolutions over all blocks); `--rows weights` the encoder's weights (by kind) rounded to the low
precision with the arithmetic in fp32.
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List

import numpy as np
import torch

from hqsmem_ros.models.checkpoints import resolve_device
from hqsmem_ros.models.sam_hq import SamHQRefiner

H, W = 96, 128
BOXES = np.array([[20, 20, 64, 60], [80, 50, 116, 86]], float)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def scene_frame(seed: int = 0) -> np.ndarray:
    """Two coloured blocks over a noisy gradient (test_precision's frame 0)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.stack([xx * 2, yy * 2, (xx + yy)], axis=-1).astype(np.float64) + rng.normal(0, 6, (H, W, 3))
    img[20:60, 20:64] = (220, 40, 40)
    img[50:86, 80:116] = (40, 200, 60)
    return np.clip(img, 0, 255).astype(np.uint8)


def _to_float32(value):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v) for v in value)
    return value


class _InLowPrecision:
    """A module's forward under autocast to `dtype`, its output cast back to float32."""

    def __init__(self, module: torch.nn.Module, device_type: str, dtype: torch.dtype, method: str = "forward"):
        self.module, self.device_type, self.dtype, self.method = module, device_type, dtype, method

    def __call__(self, *args, **kwargs):
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            return _to_float32(getattr(type(self.module), self.method)(self.module, *args, **kwargs))


def stages(model) -> Dict[str, List[torch.nn.Module]]:
    dec, prompt = model.mask_decoder, model.prompt_encoder
    return {
        "image encoder": [model.image_encoder],
        "prompt encoder (incl. dense positional encoding)": [prompt, prompt.pe_layer],
        "HQ feature branch": [dec.embedding_encoder, dec.compress_vit_feat],
        "two-way transformer": [dec.transformer],
        "upscaling convolutions": [dec.output_upscaling, dec.embedding_maskfeature],
        "hypernetwork MLPs + IoU head": [*dec.output_hypernetworks_mlps, dec.hf_mlp, dec.iou_prediction_head],
    }


def encoder_parts(model) -> Dict[str, List[torch.nn.Module]]:
    """The image encoder's parts (`--rows encoder`): TinyViT's (vit_tiny) or the ViT's."""
    enc = model.image_encoder
    if hasattr(enc, "layers"):  # TinyViT: a convolution stage, then three stages of attention blocks
        blocks = [b for layer in enc.layers[1:] for b in layer.blocks]
        parts = {"patch embedding": [enc.patch_embed]}
        parts.update({f"stage {i}": [layer] for i, layer in enumerate(enc.layers)})
        parts["attention linears, all blocks"] = [m for b in blocks for m in (b.attn.qkv, b.attn.proj)]
        parts["MLPs, all blocks"] = [b.mlp for b in blocks]
        parts["local convolutions, all blocks"] = [b.local_conv for b in blocks]
    else:
        blocks = list(enc.blocks)
        third = len(blocks) // 3
        parts = {"patch embedding": [enc.patch_embed]}
        parts.update({f"blocks {i}-{i + third - 1}": blocks[i:i + third] for i in range(0, len(blocks), third)})
        parts["attention linears, all blocks"] = [m for b in blocks for m in (b.attn.qkv, b.attn.proj)]
        parts["MLPs, all blocks"] = [b.mlp for b in blocks]
    parts["neck"] = [enc.neck]
    return parts


# `--rows weights`: the image encoder's weights of one kind rounded to the low precision, the
# arithmetic in fp32: how much of its error is the rounded weights rather than the activations.
WEIGHT_KINDS = {
    "linear and convolution": lambda m: isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)),
    "linear": lambda m: isinstance(m, torch.nn.Linear),
    "dense convolution": lambda m: isinstance(m, torch.nn.Conv2d) and m.groups == 1,
    "depthwise convolution": lambda m: isinstance(m, torch.nn.Conv2d) and m.groups > 1,
}


def round_encoder_weights(refiner: SamHQRefiner, kind: str, dtype: torch.dtype) -> SamHQRefiner:
    with torch.no_grad():
        for module in refiner.model.image_encoder.modules():
            if WEIGHT_KINDS[kind](module):
                module.weight.copy_(module.weight.to(dtype).float())
    return refiner


def _plain(refiner: SamHQRefiner) -> SamHQRefiner:
    """The package's own forwards everywhere (the token path's float32 wrappers removed)."""
    for module in refiner.model.modules():
        module.__dict__.pop("forward", None)
    return refiner


def as_before_float32_token_path(refiner: SamHQRefiner) -> SamHQRefiner:
    """A low-precision refiner run as before the token path went to float32: the prompt encoder
    and the token layers under autocast too (only the fusion of the tokens' logits stays float32)."""
    prompt = _plain(refiner).model.prompt_encoder
    for module in (prompt, prompt.pe_layer):
        module.forward = _InLowPrecision(module, refiner.device.type, DTYPES[refiner.precision])
    return refiner


def _proposals(refiner: SamHQRefiner, frame: np.ndarray):
    logits = []
    postprocess = refiner.model.postprocess_masks

    def keep_logits(masks, *sizes):
        logits.append(postprocess(masks, *sizes).float())
        return logits[-1]

    refiner.model.postprocess_masks = keep_logits  # the image-size logits the masks are thresholded from
    try:
        refiner.set_image(frame)
        masks, _scores = refiner.propose(BOXES)
    finally:
        del refiner.model.postprocess_masks
    return masks, logits[-1]


def run(model_type: str = "vit_tiny", device: str = "cpu", low: str = "bf16", seed: int = 0,
        rows: str = "all") -> List[Dict]:
    dev = resolve_device(device)
    frame = scene_frame()

    def build(precision: str) -> SamHQRefiner:
        return SamHQRefiner.from_config({"model_type": model_type, "random_weights": True, "seed": seed},
                                        device=str(dev), precision=precision)

    reference = build("fp32")
    ref_masks, ref_logits = _proposals(reference, frame)
    refiners = [(f"all in {low}, as shipped (prompt encoder and token path in float32)", build(low))]
    if rows == "all":
        refiners += [(f"all in {low}, prompt encoder in float32, token path under autocast", _plain(build(low))),
                     (f"all in {low}, as before (prompt encoder and token path under autocast)",
                      as_before_float32_token_path(build(low)))]
    # Then each stage alone in `low`: the decoder's stages ("all"), the image encoder's ("encoder").
    parts = {"all": stages, "encoder": encoder_parts}.get(rows)
    for name in parts(reference.model) if parts else ():
        refiner = _plain(build("fp32"))
        for module in parts(refiner.model)[name]:
            module.forward = _InLowPrecision(module, dev.type, DTYPES[low])
        refiners.append((f"only the {'image encoder ' * (rows == 'encoder')}{name} in {low}", refiner))
    if rows == "weights":
        refiners += [(f"fp32, the image encoder's {kind} weights rounded to {low}",
                      round_encoder_weights(build("fp32"), kind, DTYPES[low])) for kind in WEIGHT_KINDS]
    results = []
    for label, refiner in refiners:
        masks, logits = _proposals(refiner, frame)
        ious = [_iou(ref_masks[i, c], masks[i, c]) for i in range(len(BOXES)) for c in range(3)]
        results.append({"row": label, "min_iou": round(min(ious), 4), "mean_iou": round(float(np.mean(ious)), 4),
                        "logits_rel_err": round(float((logits - ref_logits).norm() / ref_logits.norm()), 4)})
    return results


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny", choices=("vit_tiny", "vit_b", "vit_l", "vit_h"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--low", default="bf16", choices=tuple(DTYPES),
                    help="fp16 on the CPU needs HQSMEM_CPU_FP16=1 (emulated there: slow)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default="all", choices=("all", "shipped", "encoder", "weights"),
                    help="shipped: only the whole model as shipped; encoder: it and each part of the image "
                    "encoder alone in the low precision; weights: it and the encoder's weights rounded")
    a = ap.parse_args(argv)
    for row in run(a.model, a.device, a.low, a.seed, a.rows):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
