"""The flow tracker's colour model under an exposure change (luminance_spread): a colour that an
exposure change moves into the next luminance bin keeps part of its object/background ratio."""
import numpy as np
import pytest

from hqsmem_ros.models.appearance import color_index
from hqsmem_ros.models.flow_tracker import FlowTracker

H, W = 96, 128
OBJECT_RGB, BACKGROUND_RGB = (150, 60, 50), (40, 90, 160)  # reddish object (luminance 85), bluish ground


def _scene(gain=1.0):
    image = np.empty((H, W, 3), np.uint8)
    image[:] = BACKGROUND_RGB
    mask = np.zeros((H, W), bool)
    mask[30:66, 40:88] = True
    image[mask] = OBJECT_RGB
    return np.clip(image.astype(np.float32) * gain, 0, 255).astype(np.uint8), mask


def _ratio_of(tracker, rgb):
    pixel = np.array([[rgb]], np.uint8)
    return float(tracker._lut(1)[color_index(pixel, *tracker.color_bins)[0, 0]])


@pytest.mark.parametrize("spread", [0.0, 0.1, 0.3])
def test_a_colour_one_luminance_bin_brighter_keeps_its_ratio_with_the_spread(spread):
    tracker = FlowTracker(luminance_spread=spread)
    image, mask = _scene()
    tracker.add_objects(0, image, {1: mask})
    tracker.commit(0, image, {1: mask})
    tracker.store_memory(0)
    brighter = tuple(c + 51 for c in OBJECT_RGB)  # luminance 85 -> 136 (the next of 4 bins), same chroma
    bins = [color_index(np.array([[c]], np.uint8), *tracker.color_bins)[0, 0] // 1024 for c in (OBJECT_RGB, brighter)]
    assert bins[1] == bins[0] + 1
    assert _ratio_of(tracker, OBJECT_RGB) > 3.0  # the object's own colour
    if spread == 0:
        assert _ratio_of(tracker, brighter) == pytest.approx(0.0, abs=1e-6)  # never seen: no evidence
    else:
        assert _ratio_of(tracker, brighter) > 2.0  # the neighbouring bin carries the object's share
        assert _ratio_of(tracker, BACKGROUND_RGB) < -2.0  # the background stays background


def test_the_spread_keeps_every_histogram_a_distribution():
    tracker = FlowTracker(luminance_spread=0.25)
    hist = np.random.default_rng(0).random(4 * 32 * 32).astype(np.float32)
    hist /= hist.sum()
    spread = tracker._spread(hist)
    assert spread.min() >= 0 and spread.sum() == pytest.approx(1.0, abs=1e-5)
    assert not np.allclose(spread, hist)


@pytest.mark.parametrize("value", [-0.1, 0.6])
def test_spread_out_of_range_is_rejected(value):
    with pytest.raises(ValueError, match="luminance_spread"):
        FlowTracker(luminance_spread=value)
