"""The weight-free features behind the verification gate (models/histogram_features.py)."""
import numpy as np
import pytest

from hqsmem_ros.core.gating import select_proposals
from hqsmem_ros.models.histogram_features import HistogramFeatures


def _scene():
    """A red disc (the object) on a blue, noisy background; the coarse mask leaks 3 px into the
    background all round."""
    rng = np.random.default_rng(0)
    h, w = 120, 160
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 2] = 180 + rng.integers(0, 30, (h, w))
    img[..., 1] = 60 + rng.integers(0, 20, (h, w))
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - 60, xx - 80)
    obj = r <= 30
    img[obj] = (200, 40, 40)
    return img, r


def _embed(feat, img, masks):
    feat.set_image(img)
    return feat.embed(np.stack(masks))


def test_context_ring_tells_a_trimmed_leak_from_a_cut_into_the_object():
    img, r = _scene()
    coarse = r <= 33          # leaks 3 px into the background
    trimmed = r <= 30         # the object: the leak removed, ring stays background
    cut = r <= 27             # cuts 3 px into the object: its ring holds the object's colour
    plain = HistogramFeatures()
    ctx = HistogramFeatures(context_weight=2.0, context_width=2)
    for feat in (plain, ctx):
        emb = _embed(feat, img, [coarse, trimmed, cut])
        assert emb.shape == (3, feat.dim)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    e0 = _embed(plain, img, [coarse, trimmed, cut])
    e1 = _embed(ctx, img, [coarse, trimmed, cut])
    cos0 = e0[1:] @ e0[0]
    cos1 = e1[1:] @ e1[0]
    # Without the ring the cut still looks much like the coarse mask (pooled histograms of
    # overlapping masks are close); with it the trim stays close and the cut falls far below.
    assert cos0[1] > 0.85
    assert cos1[0] > 0.95 and cos1[1] < 0.6
    assert cos1[0] - cos1[1] > 3 * (cos0[0] - cos0[1])
    chosen, accept, _ = select_proposals(e1[:1], np.stack([e1[[2, 1, 2]]]), tau_verify=0.93)
    assert chosen.tolist() == [1] and accept.tolist() == [True]
    _, accept, _ = select_proposals(e1[:1], np.stack([e1[[2, 2, 2]]]), tau_verify=0.93)
    assert accept.tolist() == [False]


def test_context_block_is_off_by_default_and_empty_masks_stay_zero():
    img, r = _scene()
    plain, ctx = HistogramFeatures(), HistogramFeatures(context_weight=1.0)
    assert ctx.dim > plain.dim
    full_image = np.ones(r.shape, bool)  # no ring at all: the ring block is zero, the rest unit norm
    e = _embed(ctx, img, [np.zeros(r.shape, bool), full_image])
    assert not e[0].any()
    np.testing.assert_allclose(np.linalg.norm(e[1]), 1.0, rtol=1e-5)
    assert not e[1][plain.dim:].any()


@pytest.mark.parametrize("kwargs", [{"context_weight": -1.0}, {"context_width": 0}])
def test_bad_context_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="context_"):
        HistogramFeatures(**kwargs)


def test_every_gate_grid_candidate_runs_the_pipeline():
    """config/loo/gate_grid.yaml: each candidate is a valid config whose features take the ring
    settings, and the gate then runs on real frames (a typo in the grid fails here, not mid-run)."""
    from pathlib import Path

    from hqsmem_ros.core.config import load_config
    from hqsmem_ros.core.pipeline import HQSMemPipeline, ObjectPrompt
    from hqsmem_ros.data.synth import make_sequence
    from hqsmem_ros.loo import apply_overrides, load_grid

    root = Path(__file__).resolve().parents[1] / "config"
    grid = load_grid(root / "loo" / "gate_grid.yaml")
    assert "default" in grid and len(grid) >= 2
    frames, labels = make_sequence("translate_scale", 0, (160, 120), 3, 2)
    base = load_config(root / "track.yaml")
    for name, overrides in grid.items():
        cfg = apply_overrides(base, overrides)
        pipe = HQSMemPipeline(cfg)
        want = float(overrides.get("features", {}).get("context_weight", 0.0))
        assert pipe.features.context_weight == want, name
        ids = [int(i) for i in np.unique(labels[0]) if i]
        res = pipe.process(frames[0], prompts=[ObjectPrompt(i, mask=labels[0] == i) for i in ids])
        for frame in frames[1:]:
            res = pipe.process(frame)
        assert set(np.unique(res.label_map())) - {0} <= set(ids), name
        assert res.label_map().any(), name
