"""WatershedRefiner's seam rules and colour relief (docs/benchmarks.md, the verification gate
section: where the refiner's seams go)."""
import numpy as np
import pytest

from hqsmem_ros.core.config import ConfigError
from hqsmem_ros.models.watershed_refiner import WatershedRefiner

H, W = 120, 160
YY, XX = np.mgrid[0:H, 0:W]
RADIUS = np.sqrt((YY - 60) ** 2 + (XX - 80) ** 2)
DISK = RADIUS <= 30
BOX = np.array([[40, 20, 121, 101]], np.float64)


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def _widest(image, hint, **kwargs):
    r = WatershedRefiner(**kwargs)
    r.set_image(image)
    return r.propose(BOX, hint[None])[0][0, 2]  # the widest band (8 %: 6 px) spans the true edge


def _noisy_disk(seed=0):
    rng = np.random.default_rng(seed)
    base = np.where(DISK, 200.0, 40.0)[..., None].repeat(3, axis=2)
    return np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("hint_radius", [27, 33])
def test_seams_by_colour_land_on_the_true_side_of_the_edge(hint_radius):
    # A coarse mask inside or outside the true edge: the fixed rules misplace the one-pixel seam
    # on one of the two (to the background: a ring too tight; to the object: a ring too wide).
    image, hint = _noisy_disk(), RADIUS <= hint_radius
    by_colour = _iou(_widest(image, hint, seams_by_color=True), DISK)
    tight = _iou(_widest(image, hint, lines_to_background=True), DISK)
    loose = _iou(_widest(image, hint, lines_to_background=False), DISK)
    assert by_colour > 0.99
    assert by_colour >= max(tight, loose) and min(tight, loose) < 0.97


def test_seams_the_colours_cannot_tell_follow_lines_to_background():
    # With a contrast test no edge passes, every seam is undecided: the fixed rule applies.
    image, hint = _noisy_disk(), RADIUS <= 33
    for rule in (True, False, None):
        undecided = _widest(image, hint, seams_by_color=True, seam_contrast=1e9, lines_to_background=rule)
        assert np.array_equal(undecided, _widest(image, hint, lines_to_background=rule))


def test_colour_relief_ignores_texture_edges_inside_the_object():
    # Red/green rings inside the object: their edges (a 170 step) are stronger than the object's
    # boundary on grey (110), so the image relief pulls the wide band's seam inwards; the colour
    # likelihood (both ring colours are the object's) puts it on the boundary.
    rings = np.where(((RADIUS // 3) % 2 == 0)[..., None], np.array([200, 30, 30]), np.array([30, 200, 30]))
    image = np.where(DISK[..., None], rings, np.array([90, 90, 90])).astype(np.uint8)
    hint = RADIUS <= 31
    image_only = _iou(_widest(image, hint), DISK)
    with_colour = _iou(_widest(image, hint, color_weight=1.0), DISK)
    assert image_only < 0.9 and with_colour > 0.99


@pytest.mark.parametrize("kwargs, word", [({"color_weight": 1.5}, "color_weight"),
                                          ({"color_bins": (3, 16)}, "color_bins"),
                                          ({"seam_contrast": -1}, "seam_contrast")])
def test_bad_settings_are_a_configuration_error(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        WatershedRefiner.from_config(kwargs)
