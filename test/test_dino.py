"""DINO/DINOv2 feature extractor on random-weight timm ViTs (CPU, small inputs)."""
import numpy as np
import pytest
import torch

from hqsmem_ros.core.config import ConfigError
from hqsmem_ros.models.checkpoints import CheckpointError, sha256_of_file
from hqsmem_ros.models.dino import DinoFeatureExtractor, grid_size


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def dino16():
    """DINO ViT-S/16 on a 64x96 frame at input_size 64: no resize, a 4x6 patch grid."""
    f = DinoFeatureExtractor.from_config(
        {"model_name": "dino_vits16", "random_weights": True, "input_size": 64}, device="cpu")
    f.set_image(_image(64, 96))
    return f


@pytest.fixture(scope="module")
def dinov2():
    f = DinoFeatureExtractor.from_config(
        {"model_name": "dinov2_vits14", "random_weights": True, "input_size": 56}, device="cpu")
    return f


def _keys_cubic(x, a=-0.75):
    """The cubic convolution kernel (Keys, a = -0.75) that bicubic interpolation uses."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _bicubic_axis(n_in, n_out, scale):
    """(n_out, n_in) resampling matrix along one axis, written from the definition: output pixel
    d samples the input at (d + 0.5) / scale - 0.5, four taps, indices clamped at the borders."""
    mat = np.zeros((n_out, n_in))
    for d in range(n_out):
        src = (d + 0.5) / scale - 0.5
        base = int(np.floor(src))
        for k in range(-1, 3):
            mat[d, min(max(base + k, 0), n_in - 1)] += _keys_cubic(src - (base + k))
    return mat


def _official_pos_embed_reference(pos, prefix, grid):
    """The official DINO/DINOv2 interpolate_pos_encoding in float64 NumPy, written independently:
    scale factors (n + 0.1) / M, output floor(M * scale) = n per axis."""
    pos = pos.detach().double().numpy()[0]
    side = int(round(np.sqrt(pos.shape[0] - prefix)))
    square = pos[prefix:].reshape(side, side, -1)
    rows = _bicubic_axis(side, grid[0], (grid[0] + 0.1) / side)
    cols = _bicubic_axis(side, grid[1], (grid[1] + 0.1) / side)
    patches = np.einsum("ir,jc,rcd->ijd", rows, cols, square).reshape(grid[0] * grid[1], -1)
    return np.concatenate([pos[:prefix], patches])[None]


def _reference_tokens(extractor, image):
    """Patch tokens of an independent model: timm's ViT built at exactly this input size (no
    dynamic resampling), its pos_embed replaced by the NumPy reference resampling; ImageNet
    normalisation by hand; its own forward_features."""
    import timm

    model = extractor.model
    gh, gw = image.shape[0] // extractor.patch, image.shape[1] // extractor.patch
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    fixed = timm.create_model(model.pretrained_cfg["architecture"], pretrained=False, num_classes=0,
                              img_size=image.shape[:2]).eval()
    sd = dict(model.state_dict())
    sd["pos_embed"] = torch.from_numpy(_official_pos_embed_reference(model.pos_embed, prefix, (gh, gw))).float()
    fixed.load_state_dict(sd)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        tokens = fixed.forward_features((x - mean) / std)
    return tokens[0, model.num_prefix_tokens:].reshape(gh, gw, -1).numpy()


def _unit(v):
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("model_name, input_size, shape", [
    ("dino_vits16", 64, (64, 96)),       # 4 x 6 patches, trained grid 14 x 14
    ("dino_vits16", 48, (80, 48)),       # 5 x 3
    ("dinov2_vits14", 56, (56, 70)),     # 4 x 5, trained grid 37 x 37
    ("dinov2_vits14", 42, (70, 42)),     # 5 x 3
    ("dinov2_vits14_reg", 42, (42, 56)),  # registers: position embedding without the class entry
])
def test_tokens_equal_official_resampling_at_non_native_grids(model_name, input_size, shape):
    f = DinoFeatureExtractor.from_config({"model_name": model_name, "random_weights": True, "seed": 3,
                                          "input_size": input_size}, device="cpu")
    model = f.model
    grid = (shape[0] // f.patch, shape[1] // f.patch)
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    reference = _official_pos_embed_reference(model.pos_embed, prefix, grid)
    ours = f.pos_embed_for(grid).double().numpy()
    assert ours.shape == reference.shape
    ours_err = float(np.abs(ours - reference).max())
    assert ours_err < 1e-5 * float(np.abs(reference).max())  # float32 rounding of the taps
    # timm's own resampling (exact size, antialiased) is measurably different on the same weights.
    from timm.layers import resample_abs_pos_embed
    timm_pos = resample_abs_pos_embed(model.pos_embed.detach(), new_size=grid, old_size=model.patch_embed.grid_size,
                                      num_prefix_tokens=prefix).double().numpy()
    assert float(np.abs(timm_pos - reference).max()) > 100 * max(ours_err, 1e-9)

    image = _image(*shape, seed=4)
    f.set_image(image)
    ref = _reference_tokens(f, image)
    assert f.token_map.shape == ref.shape
    np.testing.assert_allclose(f.token_map.numpy(), ref, rtol=0, atol=2e-5)


def test_native_grid_uses_the_trained_embedding():
    f = DinoFeatureExtractor.from_config({"model_name": "dino_vits16", "random_weights": True, "input_size": 224},
                                         device="cpu")
    assert torch.equal(f.pos_embed_for((14, 14)), f.model.pos_embed.detach())


def test_token_map_is_the_models_patch_tokens(dino16):
    ref = _reference_tokens(dino16, _image(64, 96))
    assert dino16.token_map.shape == (4, 6, 384)
    np.testing.assert_allclose(dino16.token_map.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_patch_weights_are_exact_area_fractions(dinov2):
    # 50 x 130 frame on a 4 x 10 grid: a patch spans 12.5 x 13 pixels of the frame.
    dinov2.set_image(_image(50, 130, seed=8))
    masks = np.zeros((3, 50, 130), bool)
    masks[0, 0:12, 0:13] = True        # 12 of the 12.5 rows of patch (0, 0), all 13 columns
    masks[1, 12, 13] = True            # one pixel: half in patch row 0, half in row 1 (column 1)
    masks[2] = np.random.default_rng(2).random((50, 130)) < 0.3
    wts = dinov2.pool_weights(masks).numpy().reshape(3, 4, 10)
    assert wts[0, 0, 0] == pytest.approx(12 / 12.5, abs=1e-6) and wts[0].sum() == pytest.approx(12 / 12.5, abs=1e-6)
    assert wts[1, 0, 1] == pytest.approx(0.5 / (12.5 * 13), abs=1e-7)
    assert wts[1, 1, 1] == pytest.approx(0.5 / (12.5 * 13), abs=1e-7)
    assert np.count_nonzero(wts[1]) == 2
    # Mean weight over the grid is the covered fraction of the frame, for any mask.
    assert wts[2].mean() == pytest.approx(masks[2].mean(), abs=1e-6)
    # Brute force on a 2x supersampled mask: patch edges at 12.5 rows fall on sample edges.
    fine = masks[2].repeat(2, axis=0).repeat(2, axis=1)
    brute = fine.reshape(4, 25, 10, 26).mean(axis=(1, 3))
    np.testing.assert_allclose(wts[2], brute, atol=1e-6)


def test_masked_pooling_matches_hand_computation(dino16):
    tokens = dino16.token_map.numpy().astype(np.float64)
    masks = np.zeros((4, 64, 96), bool)
    masks[0, 16:48, 32:80] = True               # patch rows 1-2, cols 2-4, exactly aligned
    masks[1, 0:16, 0:16] = True                 # patch (0,0) whole ...
    masks[1, 0:16, 16:24] = True                # ... and the left half of patch (0,1)
    masks[2, 48:64, 88:96] = True               # half of the last patch only
    emb = dino16.embed(masks)                   # plus masks[3]: empty
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    expected0 = _unit(tokens[1:3, 2:5].reshape(-1, 384).mean(axis=0))
    expected1 = _unit((1.0 * tokens[0, 0] + 0.5 * tokens[0, 1]) / 1.5)
    expected2 = _unit(tokens[3, 5])
    np.testing.assert_allclose(emb[0], expected0, atol=1e-5)
    np.testing.assert_allclose(emb[1], expected1, atol=1e-5)
    np.testing.assert_allclose(emb[2], expected2, atol=1e-5)
    assert not emb[3].any()
    # One batched call equals mask-by-mask calls.
    single = np.concatenate([dino16.embed(masks[k:k + 1]) for k in range(4)])
    np.testing.assert_allclose(emb, single, atol=1e-6)


def test_resized_frame_gives_unit_vectors(dinov2):
    image = _image(50, 130, seed=3)
    dinov2.set_image(image)
    gh, gw = grid_size(50, 130, 56, 14)
    assert (gh, gw) == (4, 10) and dinov2.token_map.shape == (4, 10, 384)
    masks = np.zeros((3, 50, 130), bool)
    masks[0] = True
    masks[1, 10:30, 20:70] = True
    emb = dinov2.embed(masks)
    np.testing.assert_allclose(np.linalg.norm(emb[:2], axis=1), 1.0, atol=1e-5)
    assert not emb[2].any()
    whole = _unit(dinov2.token_map.numpy().reshape(-1, 384).astype(np.float64).mean(axis=0))
    np.testing.assert_allclose(emb[0], whole, atol=1e-5)
    with pytest.raises(ValueError, match=r"masks must be \(M,50,130\)"):
        dinov2.embed(np.zeros((1, 40, 130), bool))


def _features_equal(a, b, image):
    a.set_image(image)
    b.set_image(image)
    np.testing.assert_array_equal(a.token_map.numpy(), b.token_map.numpy())


def test_timm_layout_checkpoint_loads_with_identical_features(dinov2, tmp_path):
    path = tmp_path / "dinov2_timm.pth"
    torch.save(dinov2.model.state_dict(), path)
    loaded = DinoFeatureExtractor.from_config(
        {"model_name": "dinov2_vits14", "checkpoint": str(path), "sha256": sha256_of_file(path), "input_size": 56},
        device="cpu")
    _features_equal(dinov2, loaded, _image(56, 70, seed=5))


def test_official_dinov2_layout_loads(dinov2, tmp_path):
    # facebookresearch/dinov2's dinov2_vits14_pretrain.pth: timm's names plus the unused mask_token.
    official = dict(dinov2.model.state_dict())
    official["mask_token"] = torch.zeros(1, 384)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official, path)
    loaded = DinoFeatureExtractor.from_config(
        {"model_name": "vit_small_patch14_dinov2.lvd142m", "checkpoint": str(path), "input_size": 56},
        device="cpu")
    _features_equal(dinov2, loaded, _image(56, 56, seed=6))


def test_wrong_model_checkpoint_lists_keys(dino16, tmp_path):
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(dino16.model.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        DinoFeatureExtractor.from_config({"model_name": "dinov2_vits14", "checkpoint": str(path)}, device="cpu")
    msg = str(err.value)
    assert "dino_deitsmall16_pretrain.pth" in msg and "dinov2_vits14" in msg
    assert "missing keys (blocks.0.ls1.gamma, blocks.0.ls2.gamma" in msg


def test_tampered_checksum_is_refused(dino16, tmp_path):
    path = tmp_path / "dino.pth"
    torch.save(dino16.model.state_dict(), path)
    digest = sha256_of_file(path)
    with open(path, "r+b") as f:  # flip one byte of the stored weights
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        DinoFeatureExtractor.from_config(
            {"model_name": "dino_vits16", "checkpoint": str(path), "sha256": digest}, device="cpu")


def test_config_errors():
    with pytest.raises(ConfigError, match="no checkpoint.*random_weights"):
        DinoFeatureExtractor.from_config({"model_name": "dino_vits16"}, device="cpu")
    with pytest.raises(ConfigError, match="unknown model_name 'dino_vitz'"):
        DinoFeatureExtractor.from_config({"model_name": "dino_vitz", "random_weights": True}, device="cpu")
    with pytest.raises(ConfigError, match="not a timm VisionTransformer"):
        DinoFeatureExtractor.from_config({"model_name": "resnet18", "random_weights": True}, device="cpu")
    with pytest.raises(ConfigError, match="features 'dino': unknown parameter 'size'.*known: .*input_size"):
        DinoFeatureExtractor.from_config({"random_weights": True, "size": 3}, device="cpu")
    with pytest.raises(ConfigError, match="input_size"):
        DinoFeatureExtractor.from_config({"random_weights": True, "input_size": "big"}, device="cpu")


def test_embed_before_set_image_is_an_error(dino16):
    fresh = DinoFeatureExtractor(dino16.model, input_size=64)
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.embed(np.zeros((1, 64, 96), bool))


def test_registry_builds_dino():
    from hqsmem_ros.core import registry

    f = registry.build("features", {"type": "dino", "model_name": "dino_vits16", "random_weights": True,
                                    "input_size": 32}, "cpu", "fp32")
    assert isinstance(f, DinoFeatureExtractor) and f.dim == 384
