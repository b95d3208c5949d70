"""The flow tracker's colour model and the camera's exposure (exposure_level, exposure_range):
with a level set, the colours are binned as if every frame had that median luminance, so the same
scene under another exposure gives the same colour bins and the same masks; with a range, only
frames outside it are brought to its nearer end."""
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


# exposure_range: a frame inside the range keeps its colours, one outside is brought to the
# nearer end (so a normally exposed camera is binned exactly as without the option).

def test_a_frame_inside_the_exposure_range_is_binned_as_given():
    normal, _ = _scene(gain=1.0)  # median luminance about 94
    ranged = FlowTracker(exposure_range=(80, 120))
    assert (_bins(ranged, normal) == _bins(FlowTracker(), normal)).all()


@pytest.mark.parametrize("gains, bounds", [((0.6, 0.8), (80, 120)), ((1.0, 1.25), (70, 90))])
def test_frames_outside_the_exposure_range_are_binned_at_its_nearer_end(gains, bounds):
    # Two exposures on the same side of the range (both too dark, or both too bright) are both
    # brought to that end: the same bins, where as given they differ.
    first, _ = _scene(gain=gains[0])
    second, _ = _scene(gain=gains[1])
    ranged = FlowTracker(exposure_range=bounds)
    assert (_bins(ranged, first) == _bins(ranged, second)).mean() > 0.8
    as_given = FlowTracker()
    assert (_bins(as_given, first) == _bins(as_given, second)).mean() < 0.5


def test_tracking_an_underexposed_scene_with_a_range_gives_the_masks_of_its_low_end():
    low_end, truth = _track(FlowTracker(exposure_level=80), 1.0)  # 94 brought to 80
    dark, _ = _track(FlowTracker(exposure_range=(80, 120)), 0.6)  # 56 brought to 80
    assert (low_end & dark).sum() / (low_end | dark).sum() > 0.97
    assert (dark & truth).sum() / (dark | truth).sum() > 0.9


@pytest.mark.parametrize("bounds", [(-1.0, 100.0), (120.0, 80.0), (0.0, 300.0)])
def test_exposure_range_out_of_order_or_bounds_is_rejected(bounds):
    with pytest.raises(ValueError, match="exposure_range"):
        FlowTracker(exposure_range=bounds)


def test_exposure_level_and_range_together_are_rejected():
    with pytest.raises(ValueError, match="only one"):
        FlowTracker(exposure_level=128, exposure_range=(96, 144))
