"""Mixed precision on the CPU: bf16 and fp16 autocast give the fp32 masks.

Each neural part where the `precision` setting applies runs the same random weights on the same
frames in fp32 and in bf16 or fp16; the masks must agree (IoU >= 0.98 per object). The masks are
checked to be neither (nearly) empty nor full first, so that agreement is not trivial.

fp16 runs on the CPU through the product's own switch (HQSMEM_CPU_FP16=1, models/checkpoints.py;
without it fp16 on the CPU is refused, tested below): torch emulates float16 on most CPUs, so it is
slow there, but it rounds as fp16 does on a GPU, so the fp16 profiles' numerics are checked here.
SAM-HQ vit_b in fp16 is not tested here: its emulated ViT-B encoder takes minutes (measured by
tools/precision_stages instead, docs/benchmarks.md).

SAM-HQ runs its token path in float32 (prompt encoder, token self-attention and MLP,
hypernetwork MLPs, IoU head, logit fusion; see sam_hq.py). vit_b then reaches 0.98 per proposal
in bf16 (0.991-0.997; 0.981-0.994 before). vit_tiny reaches it in fp16 (11-bit mantissa), not in
bf16 (8-bit): 0.963-0.982 per proposal, mean 0.975 (0.940-0.978, mean 0.964 before). What is left
is TinyViT's encoder itself: in bf16 with everything else in fp32 it alone gives 0.972-0.985 (its
image embedding is 2.0 % off fp32 in L2, vit_b's 0.8 %), spread over every stage, and mostly its
weights as bf16 holds them (rounded alone, arithmetic in fp32: 0.975); random weights give mask
logits with no margin at the boundary (mean |logit| 0.06), so that error moves the boundary. Its
bf16 test holds that measured level, a fact about the model that no profile ships: config/sam2.yaml
runs its vit_tiny refiner in fp32 (its block's own precision). The float32 token path itself is
tested below.

CHECKED lists every (model, low precision) pair this file checks against fp32 (IoU >= 0.98; DINO:
cosine > 0.99); the tests below are parametrized from it, and every shipped profile's low-precision
models (block precision or the pipeline's) must be in it, so no profile ships an unchecked pair."""
import functools
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hqsmem_ros.core import registry
from hqsmem_ros.core.config import ConfigError, load_config
from hqsmem_ros.core.pipeline import HQSMemPipeline
from hqsmem_ros.models.checkpoints import CPU_FP16_SWITCH, cpu_autocast_has_float16

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # conftest.py

H, W = 96, 128
CONFIG = Path(__file__).parent.parent / "config"

# (kind, model block, precision) of every pair checked here against fp32 at the small sizes above.
CHECKED = [
    ("tracker", {"type": "deaot", "model": "r50_deaotl"}, "bf16"),
    ("tracker", {"type": "deaot", "model": "r50_deaotl"}, "fp16"),
    ("tracker", {"type": "sam2", "model": "tiny", "image_size": 128}, "bf16"),
    ("tracker", {"type": "sam2", "model": "tiny", "image_size": 128}, "fp16"),
    ("refiner", {"type": "sam_hq", "model_type": "vit_b"}, "bf16"),
    ("refiner", {"type": "sam_hq", "model_type": "vit_tiny"}, "fp16"),  # as paper_models / jetson_orin run it
    ("features", {"type": "dino", "model_name": "dinov2_vits14"}, "bf16"),
    ("features", {"type": "dino", "model_name": "dinov2_vits14"}, "fp16"),
]


def _checked(kind):
    return [pytest.param(spec, precision, id=f"{spec['type']}-{list(spec.values())[1]}-{precision}")
            for k, spec, precision in CHECKED if k == kind]


@pytest.fixture
def allow(monkeypatch):
    """allow(precision): fp16 on the CPU through the product's switch; bf16 needs nothing."""
    def _allow(precision):
        if precision == "fp16":
            if not cpu_autocast_has_float16():
                pytest.skip("this torch's CPU autocast has no float16")
            monkeypatch.setenv(CPU_FP16_SWITCH, "1")
        return precision
    return _allow


def _iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _scene(n_frames, seed=0):
    """Two coloured blocks drifting over a noisy gradient; frames and the frame-0 object masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    background = np.stack([xx * 2, yy * 2, (xx + yy)], axis=-1).astype(np.float64)
    frames = []
    for t in range(n_frames):
        img = background + rng.normal(0, 6, (H, W, 3))
        img[20 + t:60 + t, 20 + 2 * t:64 + 2 * t] = (220, 40, 40)
        img[50:86, 80 - t:116 - t] = (40, 200, 60)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    masks = {1: np.zeros((H, W), bool), 2: np.zeros((H, W), bool)}
    masks[1][20:60, 20:64] = True
    masks[2][50:86, 80:116] = True
    return frames, masks


def _track(spec, precision, frames, masks):
    tracker = registry.build("tracker", dict(spec, random_weights=True, seed=1), "cpu", precision)
    tracker.add_objects(0, frames[0], masks)
    tracker.commit(0, frames[0], masks)
    out = []
    for t in range(1, len(frames)):
        result = tracker.track(t, frames[t])
        tracker.commit(t, frames[t], result)
        out.append(result)
    return out


def _assert_agree(fp32, low, what, at_least=0.98):
    """IoU >= at_least, or a single pixel of difference: below 1 / (1 - at_least) pixels (50 at
    0.98) one pixel already breaks the IoU bar (a random-weight DeAOT's 22-pixel mask in bf16 under
    torch 2.14: IoU 0.9545 from one pixel), so the bar is never looser than one pixel."""
    assert 16 <= fp32.sum() <= 0.995 * fp32.size, f"{what}: fp32 mask has {fp32.sum()} pixels: a trivial case"
    iou = _iou(fp32, low)
    differ = int(np.logical_xor(fp32, low).sum())
    assert iou >= at_least or differ <= 1, f"{what}: IoU fp32 vs low precision {iou:.4f} ({differ} pixels differ)"
    return iou


@pytest.mark.parametrize("spec,precision", _checked("tracker"))
def test_tracker_low_precision_masks_agree_with_fp32(spec, precision, allow):
    """SAM2 in fp16 stopped at its first memory read while it stored memory features in
    bfloat16 (fp16 autocast cannot concatenate them); it stores float16 there (sam2_tracker.py)."""
    frames, masks = _scene(4)
    ref = _track(spec, "fp32", frames, masks)
    low = _track(spec, allow(precision), frames, masks)
    for t, (a, b) in enumerate(zip(ref, low), start=1):
        assert sorted(a) == sorted(b) == [1, 2]
        for obj in a:
            _assert_agree(a[obj], b[obj], f"{spec['type']} {precision} frame {t} object {obj}")


@functools.lru_cache(maxsize=None)
def _sam_hq_proposals(model_type, precision):
    frames, _ = _scene(1)
    boxes = np.array([[20, 20, 64, 60], [80, 50, 116, 86]], float)
    refiner = registry.build("refiner", {"type": "sam_hq", "model_type": model_type, "random_weights": True,
                                         "seed": 0}, "cpu", precision)
    refiner.set_image(frames[0])
    masks, _scores = refiner.propose(boxes)
    assert masks.shape == (2, 3, H, W)
    masks.flags.writeable = False  # cached: shared by the tests
    return masks


@pytest.mark.parametrize("spec,precision", _checked("refiner"))
def test_sam_hq_low_precision_proposals_agree_with_fp32(spec, precision, allow):
    model_type = spec["model_type"]
    ref, low = _sam_hq_proposals(model_type, "fp32"), _sam_hq_proposals(model_type, allow(precision))
    for i in range(2):
        for c in range(3):
            _assert_agree(ref[i, c], low[i, c], f"sam_hq {model_type} {precision} box {i} proposal {c}")


def test_sam_hq_vit_tiny_bf16_not_shipped_by_any_profile_holds_the_measured_level():
    """vit_tiny in bf16 is not in CHECKED (below 0.98, see the module docstring), so no profile
    runs it: config/sam2.yaml's pipeline is bf16 and its refiner block says fp32."""
    ref, low = _sam_hq_proposals("vit_tiny", "fp32"), _sam_hq_proposals("vit_tiny", "bf16")
    ious = [_assert_agree(ref[i, c], low[i, c], f"sam_hq vit_tiny box {i} proposal {c}", at_least=0.95)
            for i in range(2) for c in range(3)]
    assert np.mean(ious) >= 0.965, ious


def test_sam_hq_token_path_runs_in_float32_and_the_image_path_in_bf16():
    """The split the module docstring states, seen from the layers' outputs under bf16."""
    frames, _ = _scene(1)
    refiner = registry.build("refiner", {"type": "sam_hq", "model_type": "vit_tiny", "random_weights": True},
                             "cpu", "bf16")
    dec = refiner.model.mask_decoder
    block = dec.transformer.layers[0]
    watched = {"token self-attention": block.self_attn, "token MLP": block.mlp, "HQ token MLP": dec.hf_mlp,
               "IoU head": dec.iou_prediction_head, "prompt encoder": refiner.model.prompt_encoder,
               "token-to-image attention": block.cross_attn_token_to_image,
               "image-to-token attention": block.cross_attn_image_to_token, "upscaling": dec.output_upscaling,
               "image encoder stage": refiner.model.image_encoder.layers[-1]}
    seen = {}

    def record(name, output):
        seen.setdefault(name, (output[0] if isinstance(output, tuple) else output).dtype)

    for name, module in watched.items():
        module.register_forward_hook(lambda _m, _i, out, name=name: record(name, out))
    refiner.set_image(frames[0])
    masks, scores = refiner.propose(np.array([[20, 20, 64, 60]], float))
    assert masks.dtype == np.bool_ and scores.dtype == np.float32
    float32 = ("token self-attention", "token MLP", "HQ token MLP", "IoU head", "prompt encoder")
    assert {n: seen[n] for n in float32} == {n: torch.float32 for n in float32}
    low = ("token-to-image attention", "image-to-token attention", "upscaling", "image encoder stage")
    assert {n: seen[n] for n in low} == {n: torch.bfloat16 for n in low}


def test_precision_stages_as_before_puts_the_prompt_encoder_and_token_path_under_autocast():
    """The 'before' rows of tools/precision_stages and bench_models --sam-precision: the float32
    wrappers gone, and the prompt encoder rounded as under autocast (but handing back float32)."""
    from hqsmem_ros.tools.precision_stages import as_before_float32_token_path

    refiner = registry.build("refiner", {"type": "sam_hq", "model_type": "vit_tiny", "random_weights": True},
                             "cpu", "bf16")
    prompt = refiner.model.prompt_encoder
    box = torch.tensor([[100.0, 200.0, 600.0, 700.0]])
    with torch.inference_mode():
        shipped, _ = prompt(points=None, boxes=box, masks=None)
        as_before_float32_token_path(refiner)
        before, _ = prompt(points=None, boxes=box, masks=None)
    assert not any("forward" in m.__dict__ for m in refiner.model.mask_decoder.modules())
    assert shipped.dtype == before.dtype == torch.float32
    assert not torch.equal(shipped, before)
    torch.testing.assert_close(before, before.bfloat16().float())  # what bf16 holds, exactly
    torch.testing.assert_close(before, shipped, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("spec,precision", _checked("features"))
def test_dino_low_precision_embeddings_agree_with_fp32(spec, precision, allow):
    frames, masks = _scene(1)
    emb = {}
    for p in ("fp32", allow(precision)):
        f = registry.build("features", dict(spec, random_weights=True, input_size=56), "cpu", p)
        f.set_image(frames[0])
        emb[p] = f.embed(np.stack([masks[1], masks[2]]))
    cos = (emb["fp32"] * emb[precision]).sum(axis=1)
    assert np.all(cos > 0.99), cos


def test_fp16_on_cpu_is_refused_with_the_alternative(monkeypatch):
    from hqsmem_ros.models import checkpoints
    from hqsmem_ros.models.checkpoints import DeviceError

    monkeypatch.delenv(CPU_FP16_SWITCH, raising=False)
    refusal = f"'fp16' needs a CUDA device; on the CPU use 'fp32' or 'bf16'.*{CPU_FP16_SWITCH}=1"
    with pytest.raises(DeviceError, match=refusal):
        registry.build("tracker", {"type": "deaot", "model": "deaott", "random_weights": True}, "cpu", "fp16")
    # With the switch, a torch whose CPU autocast lacks float16 is still refused, naming why.
    monkeypatch.setenv(CPU_FP16_SWITCH, "1")
    monkeypatch.setattr(checkpoints, "cpu_autocast_has_float16", lambda: False)
    lacking = re.escape(f"CPU autocast of torch {torch.__version__} has no float16; use 'fp32' or 'bf16'")
    with pytest.raises(DeviceError, match=lacking):
        registry.build("refiner", {"type": "sam_hq", "random_weights": True}, "cpu", "fp16")


def test_precision_stages_encoder_rows_round_and_wrap_only_what_they_name():
    """`--rows weights` rounds only the named kind of the image encoder's weights; `--rows encoder`
    names modules of the image encoder, its stages covering every block."""
    from hqsmem_ros.tools.precision_stages import encoder_parts, round_encoder_weights

    refiner = registry.build("refiner", {"type": "sam_hq", "model_type": "vit_tiny", "random_weights": True},
                             "cpu", "fp32")
    enc = refiner.model.image_encoder
    before = {name: w.clone() for name, w in refiner.model.named_parameters()}
    round_encoder_weights(refiner, "linear", torch.bfloat16)
    changed = {name for name, w in refiner.model.named_parameters() if not torch.equal(w, before[name])}
    linear_weights = {f"image_encoder.{name}.weight" for name, m in enc.named_modules()
                      if isinstance(m, torch.nn.Linear)}
    assert changed and changed <= linear_weights  # no bias, no convolution, nothing outside the encoder
    for name in linear_weights:
        w = dict(refiner.model.named_parameters())[name]
        assert torch.equal(w, w.bfloat16().float())

    parts = encoder_parts(refiner.model)
    inside = set(enc.modules())
    assert all(m in inside for modules in parts.values() for m in modules)
    staged = {b for name, modules in parts.items() if name.startswith("stage") for m in modules for b in m.modules()}
    assert all(b.mlp in staged for layer in enc.layers[1:] for b in layer.blocks)


# The setting that names a neural model's network, and its canonical name (aliases resolved).
def _network(kind, spec):
    from hqsmem_ros.models import dino, sam2_model

    key = {"deaot": "model", "sam2": "model", "sam_hq": "model_type", "dino": "model_name"}[spec["type"]]
    settings = registry.model_class(kind, spec["type"]).parse_settings({key: spec[key]} if key in spec else {})
    name = getattr(settings, key)
    canonical = {"sam2": sam2_model.resolve_model, "dino": lambda n: dino.ALIASES.get(n, n)}
    return kind, spec["type"], canonical.get(spec["type"], str)(name)


def _unchecked_low_precision(cfg):
    """The profile's (model, precision) pairs below fp32 (the block's precision or the pipeline's,
    by the config's own rule) that CHECKED does not hold."""
    checked = {(_network(kind, spec), precision) for kind, spec, precision in CHECKED}
    out = []
    for kind in ("tracker", "refiner", "features"):
        spec, precision = getattr(cfg, kind), cfg.model_precision(kind)
        if registry.model_class(kind, spec["type"]).takes_precision and precision != "fp32":
            if (_network(kind, spec), precision) not in checked:
                out.append((_network(kind, spec), precision))
    return out


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG.glob("*.yaml")))
def test_every_low_precision_model_a_profile_ships_is_checked_here(name):
    assert _unchecked_low_precision(load_config(CONFIG / name)) == []


def test_the_profile_check_finds_sam2_yamls_refiner_without_its_fp32_block():
    """Without its block's fp32, config/sam2.yaml would ship vit_tiny in bf16, which is not checked."""
    cfg = load_config(CONFIG / "sam2.yaml")
    assert cfg.precision == "bf16" and cfg.model_precision("refiner") == "fp32"
    lows = {kind for kind in ("tracker", "features") if cfg.model_precision(kind) == "bf16"}
    assert lows == {"tracker", "features"}  # the rest of the profile is bf16, and checked
    plain = cfg.replace(refiner={k: v for k, v in cfg.refiner.items() if k != "precision"})
    assert _unchecked_low_precision(plain) == [(("refiner", "sam_hq", "vit_tiny"), "bf16")]


@pytest.mark.parametrize("pipeline_precision,refiner_precision", [("bf16", "fp32"), ("fp32", "bf16")])
def test_a_block_precision_reaches_its_model_and_the_others_keep_the_pipelines(pipeline_precision, refiner_precision):
    """Built as the node and `hqsmem` build it (HQSMemPipeline from a config); seen from layer outputs."""
    cfg = load_config({"device": "cpu", "precision": pipeline_precision, "tracker": {"type": "flow"},
                       "refiner": {"type": "sam_hq", "model_type": "vit_tiny", "random_weights": True,
                                   "precision": refiner_precision},
                       "features": {"type": "dino", "model_name": "dinov2_vits14", "random_weights": True,
                                    "input_size": 56}})
    pipeline = HQSMemPipeline(cfg)
    seen = {}

    def record(name, output):  # returns None: the output goes on unchanged
        seen.setdefault(name, output.dtype)

    for name, module in {"refiner": pipeline.refiner.model.image_encoder.layers[-1],
                         "features": pipeline.features.model.blocks[-1].attn.qkv}.items():
        module.register_forward_hook(lambda _m, _i, out, name=name: record(name, out))
    frames, _ = _scene(1)
    pipeline.refiner.set_image(frames[0])
    masks, _ = pipeline.refiner.propose(np.array([[20, 20, 64, 60], [80, 50, 116, 86]], float))
    pipeline.features.set_image(frames[0])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}
    assert seen == {"refiner": dtype[refiner_precision], "features": dtype[pipeline_precision]}
    if refiner_precision == "fp32":  # the shipped sam2.yaml case: the fp32 proposals, whatever the pipeline's
        ref = _sam_hq_proposals("vit_tiny", "fp32")
        for i in range(2):
            for c in range(3):
                _assert_agree(ref[i, c], masks[i, c], f"vit_tiny block fp32, pipeline bf16: box {i} proposal {c}")


def test_a_block_fp16_on_the_cpu_is_refused_naming_the_block(monkeypatch):
    monkeypatch.delenv(CPU_FP16_SWITCH, raising=False)
    with pytest.raises(ConfigError, match=r"^refiner\.precision \(refiner 'sam_hq'\): precision 'fp16' needs a CUDA"):
        HQSMemPipeline(load_config({"device": "cpu", "refiner": {"type": "sam_hq", "random_weights": True,
                                                                 "precision": "fp16"}}))
