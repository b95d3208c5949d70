"""The flow tracker's colour model and the camera's exposure (exposure_level): with a level set,
the colours are binned as if every frame had that median luminance, so the same scene under
another exposure gives the same colour bins and the same masks."""
import cv2
import numpy as np
import pytest

from hqsmem_ros.models.flow_tracker import FlowTracker

H, W = 120, 160


def _scene(t=0, gain=1.0):
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.normal(0, 1, (H, W)).astype(np.float32), (0, 0), 3.0)
    image = np.stack([110 + 40 * texture, 90 + 30 * texture, 70 + 20 * texture], -1)  # brown ground
    mask = np.zeros((H, W), bool)
    mask[40:80, 30 + 4 * t:70 + 4 * t] = True
    image[mask] = (200, 185, 175)  # a pale object, like DAVIS's dog
    return np.clip(image * gain, 0, 255).astype(np.uint8), mask


def _bins(tracker, image):
    return tracker._frame_data(id(image), image)[1]


def test_colour_bins_do_not_depend_on_the_exposure_with_a_level():
    bright, _ = _scene(gain=1.0)
    dark, _ = _scene(gain=0.6)
    fixed = FlowTracker(exposure_level=128)
    same = (_bins(fixed, bright) == _bins(fixed, dark)).mean()
    as_given = FlowTracker()
    assert same > 0.8  # all but pixels next to a bin edge (the dark frame's 8-bit rounding)
    assert (_bins(as_given, bright) == _bins(as_given, dark)).mean() < 0.1  # the exposure moves the bins


def _track(tracker, gain, frames=6):
    image, mask = _scene(0, gain)
    tracker.add_objects(0, image, {1: mask})
    tracker.commit(0, image, {1: mask})
    tracker.store_memory(0)
    for t in range(1, frames + 1):
        image, truth = _scene(t, gain)
        out = tracker.track(t, image)[1]
        tracker.commit(t, image, {1: out})
    return out, truth


def test_tracking_with_a_level_set_gives_the_same_masks_under_either_exposure():
    # End to end with the option on (this easy scene is tracked without it too; what tells the
    # option apart is the bin test above).
    normal, truth = _track(FlowTracker(exposure_level=128), 1.0)
    dark, _ = _track(FlowTracker(exposure_level=128), 0.6)
    iou = (normal & dark).sum() / (normal | dark).sum()
    assert iou > 0.97
    assert (normal & truth).sum() / (normal | truth).sum() > 0.9


@pytest.mark.parametrize("value", [-1.0, 300.0])
def test_exposure_level_out_of_range_is_rejected(value):
    with pytest.raises(ValueError, match="exposure_level"):
        FlowTracker(exposure_level=value)
