"""SAM-HQ refiner on a random-weight vit_tiny (CPU): one encoder pass shared by the module.

The reference is the package's own `SamPredictor.predict`: for every box, the mask it returns
must be reproduced exactly by the proposal whose token it picked, with all boxes in one batch.
"""
import numpy as np
import pytest
import torch

from hqsmem_ros.core.config import ConfigError
from hqsmem_ros.models.checkpoints import CheckpointError, apply_state_dict, sha256_of_file
from hqsmem_ros.models.sam_hq import SamHQRefiner, guess_model_type, token_path_in_float32

H, W = 96, 128
BOXES = np.array([[30.0, 20.0, 90.0, 70.0], [5.0, 8.0, 60.0, 50.0]])


def _image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    img[20:70, 30:90] = (200, 30, 30)
    img[8:50, 5:60] //= 3
    return img


@pytest.fixture(scope="module")
def refiner():
    r = SamHQRefiner.from_config({"model_type": "vit_tiny", "random_weights": True, "seed": 0}, device="cpu")
    r.set_image(_image())  # the module's only image-encoder pass
    return r


@pytest.fixture
def favour_token(refiner):
    """Shift the IoU head's bias so that multimask token c+1 has the best predicted IoU.

    Mask logits do not depend on the IoU head, so this only changes which token the package's
    predictor picks, letting every proposal slot be compared with the predictor's output."""
    bias = refiner.model.mask_decoder.iou_prediction_head.layers[-1].bias
    saved = bias.detach().clone()

    def apply(c):
        with torch.no_grad():
            bias.copy_(saved)
            bias[c + 1] += 5.0
    yield apply
    with torch.no_grad():
        bias.copy_(saved)


def _set_mode(refiner, hq_token_only, multimask):
    refiner.hq_token_only, refiner.multimask = hq_token_only, multimask


@pytest.fixture(scope="module")
def fused(refiner):
    """Both objects' proposals from one batched call, hq_token_only=False, the model's own IoU head."""
    _set_mode(refiner, False, True)
    masks, scores = refiner.propose(BOXES)
    assert masks.shape == (2, 3, H, W) and masks.dtype == bool and scores.shape == (2, 3)
    return masks, scores


def test_best_proposal_is_the_predictors_mask(refiner, fused):
    masks, scores = fused
    for n, box in enumerate(BOXES):
        ref_masks, ref_iou, _ = refiner.predictor.predict(box=box, multimask_output=True, hq_token_only=False)
        best = int(np.argmax(scores[n]))
        assert 0 < ref_masks[0].sum() < H * W  # a real mask, not all-empty or all-full
        np.testing.assert_array_equal(masks[n, best], ref_masks[0])
        assert scores[n, best] == pytest.approx(float(ref_iou[0]), rel=1e-5, abs=1e-6)


def test_click_prompts_reproduce_the_predictors_mask(refiner):
    # Three objects in one call: clicks alone (two lengths, padded), and clicks with a box.
    _set_mode(refiner, False, True)
    points = [np.array([[60.0, 45.0]]), np.array([[20.0, 20.0], [100.0, 80.0]]), np.array([[50.0, 30.0]])]
    labels = [np.array([1]), np.array([1, 0]), np.array([1])]
    boxes = np.array([[np.nan] * 4, [np.nan] * 4, [30.0, 20.0, 90.0, 70.0]])
    masks, scores = refiner.propose_points(points, labels, boxes)
    assert masks.shape == (3, 3, H, W) and scores.shape == (3, 3)
    for n in range(3):
        box = None if np.isnan(boxes[n]).any() else boxes[n]
        ref_masks, ref_iou, _ = refiner.predictor.predict(
            point_coords=points[n], point_labels=labels[n], box=box, multimask_output=True, hq_token_only=False)
        best = int(np.argmax(scores[n]))
        np.testing.assert_array_equal(masks[n, best], ref_masks[0])
        assert scores[n, best] == pytest.approx(float(ref_iou[0]), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("target", [0, 1, 2])
def test_every_slot_is_its_token_fused_with_hq(refiner, fused, favour_token, target):
    # Mask logits do not depend on the IoU head: the batched masks computed once stay valid.
    masks, _ = fused
    favour_token(target)
    for n, box in enumerate(BOXES):
        ref_masks, ref_iou, _ = refiner.predictor.predict(box=box, multimask_output=True, hq_token_only=False)
        assert 0 < ref_masks[0].sum() < H * W
        np.testing.assert_array_equal(masks[n, target], ref_masks[0])


def test_three_proposals_are_distinct_tokens(fused):
    masks, _ = fused
    for n in range(len(BOXES)):
        assert not np.array_equal(masks[n, 0], masks[n, 1])
        assert not np.array_equal(masks[n, 1], masks[n, 2])


def test_hq_token_only_replaces_the_best_slot_by_the_hq_mask(refiner, fused, favour_token):
    favour_token(2)
    _set_mode(refiner, True, True)
    masks, scores = refiner.propose(BOXES)
    for n, box in enumerate(BOXES):
        ref_masks, ref_iou, _ = refiner.predictor.predict(box=box, multimask_output=True, hq_token_only=True)
        assert int(np.argmax(scores[n])) == 2
        assert 0 < ref_masks[0].sum() < H * W
        np.testing.assert_array_equal(masks[n, 2], ref_masks[0])
        assert scores[n, 2] == pytest.approx(float(ref_iou[0]), rel=1e-5, abs=1e-6)
    np.testing.assert_array_equal(masks[:, :2], fused[0][:, :2])
    assert not np.array_equal(masks[:, 2], fused[0][:, 2])


@pytest.mark.parametrize("hq_token_only", [False, True])
def test_single_mask_mode_matches_predictor(refiner, hq_token_only):
    _set_mode(refiner, hq_token_only, False)
    boxes = np.array([[5.0, 8.0, 60.0, 50.0], [40.0, 30.0, 80.0, 60.0]])  # non-empty single masks here
    masks, scores = refiner.propose(boxes)
    for n, box in enumerate(boxes):
        ref_masks, ref_iou, _ = refiner.predictor.predict(
            box=box, multimask_output=False, hq_token_only=hq_token_only)
        assert 0 < ref_masks[0].sum() < H * W
        for c in range(3):
            np.testing.assert_array_equal(masks[n, c], ref_masks[0])
        assert scores[n] == pytest.approx([float(ref_iou[0])] * 3, rel=1e-5, abs=1e-6)


def test_boxes_are_clipped_to_the_image(refiner):
    _set_mode(refiner, False, True)
    inside = [100.0, 60.0, 128.0, 96.0]
    overhanging = [100.0, 60.0, 400.0, 300.0]
    masks, scores = refiner.propose(np.array([inside, overhanging]))
    np.testing.assert_array_equal(masks[0], masks[1])
    np.testing.assert_array_equal(scores[0], scores[1])


@pytest.mark.parametrize("bad, where", [
    ([10.0, 10.0, 10.0, 40.0], "zero width"),
    ([200.0, 10.0, 300.0, 40.0], "right of the image"),
    ([-50.0, -40.0, -1.0, -2.0], "above-left of the image"),
])
def test_box_without_area_is_a_clear_error(refiner, bad, where):
    boxes = np.array([[30.0, 20.0, 90.0, 70.0], bad])
    with pytest.raises(ValueError, match=r"box 1 \[.*\] has no area inside the 128x96 image"):
        refiner.propose(boxes)


def test_bad_box_shapes_and_values(refiner):
    with pytest.raises(ValueError, match=r"\(N,4\)"):
        refiner.propose(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        refiner.propose(np.array([[0.0, 0.0, np.nan, 5.0]]))
    masks, scores = refiner.propose(np.zeros((0, 4)))
    assert masks.shape == (0, 3, H, W) and scores.shape == (0, 3)


def test_float32_token_path_leaves_fp32_bit_identical(refiner, fused):
    """The token path's float32 wrappers (for fp16/bf16) change nothing in fp32: the proposals
    and the HQ token's hypernetwork weights equal, bit for bit, those of the package's own layers."""
    dec = refiner.model.mask_decoder
    hyper = []
    hook = dec.hf_mlp.register_forward_hook(lambda _m, _i, out: hyper.append(out.clone()))
    try:
        _set_mode(refiner, False, True)
        wrapped = refiner.propose(BOXES)
        wrapped_modules = [m for m in refiner.model.modules() if "forward" in m.__dict__]
        # IoU head, HQ token MLP, 4 token MLPs, 2 transformer blocks x (self-attention, MLP)
        assert len(wrapped_modules) == token_path_in_float32(refiner.model) == 2 + 4 + 2 * 2
        for m in wrapped_modules:
            del m.forward
        plain = refiner.propose(BOXES)
    finally:
        token_path_in_float32(refiner.model)
        hook.remove()
    np.testing.assert_array_equal(wrapped[0], plain[0])
    np.testing.assert_array_equal(wrapped[1], plain[1])
    np.testing.assert_array_equal(wrapped[0], fused[0])
    assert torch.equal(hyper[0], hyper[1])


def test_propose_before_set_image_is_an_error(refiner):
    fresh = SamHQRefiner(refiner.model, "cpu")
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.propose(BOXES)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        fresh.set_image(np.zeros((H, W), np.uint8))


def test_config_errors(monkeypatch):
    from hqsmem_ros.core import registry
    from hqsmem_ros.models.checkpoints import CPU_FP16_SWITCH

    monkeypatch.delenv(CPU_FP16_SWITCH, raising=False)  # without it fp16 on the CPU is refused

    with pytest.raises(ConfigError, match="no checkpoint.*random_weights"):
        SamHQRefiner.from_config({"model_type": "vit_tiny"}, device="cpu")
    with pytest.raises(ConfigError, match="refiner sam_hq: no checkpoint given for vit_b"):
        registry.build("refiner", {"type": "sam_hq", "model_type": "vit_b"}, "cpu", "fp32")
    with pytest.raises(ConfigError, match="model_type must be one of"):
        SamHQRefiner.from_config({"model_type": "vit_xl", "random_weights": True}, device="cpu")
    with pytest.raises(ConfigError, match=r"refiner 'sam_hq': unknown parameter 'boxes' \(known: checkpoint, .*model_type"):
        SamHQRefiner.from_config({"random_weights": True, "boxes": 3}, device="cpu")
    with pytest.raises(ValueError, match="fp16"):
        SamHQRefiner.from_config({"random_weights": True}, device="cpu", precision="fp16")


def test_official_layout_checkpoint_loads_through_config(refiner, tmp_path):
    source = refiner.model.state_dict()
    path = tmp_path / "sam_hq_vit_tiny.pth"
    torch.save({"model": source}, path)  # a wrapped copy of the whole model's state_dict
    loaded = SamHQRefiner.from_config(
        {"model_type": "vit_tiny", "checkpoint": str(path), "sha256": sha256_of_file(path)}, device="cpu")
    own = loaded.model.state_dict()
    assert sorted(own) == sorted(source)
    assert all(torch.equal(own[k], source[k]) for k in source)

    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        SamHQRefiner.from_config({"model_type": "vit_tiny", "checkpoint": str(path), "sha256": "f" * 64},
                                 device="cpu")


def test_checkpoint_without_hq_decoder_is_refused_with_keys(refiner, tmp_path):
    plain = {k: v for k, v in refiner.model.state_dict().items()
             if not k.startswith(("mask_decoder.hf_", "mask_decoder.compress_vit_feat",
                                  "mask_decoder.embedding_encoder", "mask_decoder.embedding_maskfeature"))}
    path = tmp_path / "mobile_sam.pt"
    torch.save(plain, path)
    with pytest.raises(CheckpointError) as err:
        SamHQRefiner.from_config({"model_type": "vit_tiny", "checkpoint": str(path)}, device="cpu")
    msg = str(err.value)
    assert "mobile_sam.pt" in msg and "SAM-HQ vit_tiny" in msg
    assert "missing keys (mask_decoder.hf_token.weight" in msg
    assert "original SAM vit_tiny checkpoint without the HQ decoder" in msg


def test_wrong_model_type_is_reported_as_such(refiner):
    sd = dict(refiner.model.state_dict())
    sd["mask_decoder.compress_vit_feat.0.weight"] = torch.zeros(768, 256, 2, 2)  # vit_b's ViT width
    before = refiner.model.mask_decoder.compress_vit_feat[0].weight.clone()
    with pytest.raises(CheckpointError, match=r"shape mismatches \(mask_decoder.compress_vit_feat.0.weight: "
                                              r"checkpoint \(768, 256, 2, 2\) vs model \(160, 256, 2, 2\)"):
        apply_state_dict(refiner.model, sd, "sam_hq_vit_b.pth", "SAM-HQ vit_tiny")
    assert torch.equal(refiner.model.mask_decoder.compress_vit_feat[0].weight, before)


def test_guess_model_type_from_keys():
    vit_b = {f"image_encoder.blocks.{i}.norm1.weight": 0 for i in range(12)}
    vit_b["mask_decoder.hf_token.weight"] = 0
    assert "SAM-HQ vit_b" in guess_model_type(vit_b)
    vit_h = {f"image_encoder.blocks.{i}.norm1.weight": 0 for i in range(32)}
    assert "original SAM vit_h" in guess_model_type(vit_h)
    assert "vit_tiny" in guess_model_type({"image_encoder.layers.0.x": 0, "mask_decoder.hf_token.weight": 0})
    assert guess_model_type({"foo": 0}) == ""
