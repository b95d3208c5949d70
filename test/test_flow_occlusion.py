"""Occlusion order in the flow tracker (occlusion_order): a look-alike that passes behind another
and comes out again keeps its pixels and its id, instead of the occluder's mask growing over it."""
from pathlib import Path

import numpy as np
import pytest

from hqsmem_ros.ablation import run_sequence
from hqsmem_ros.core.config import load_config
from hqsmem_ros.data.synth import make_sequence
from hqsmem_ros.eval.metrics import evaluate_sequence_arrays
from hqsmem_ros.models.flow_tracker import FlowTracker

H, W = 120, 160
FRONT, BACK = 1, 2


def _scene(t):
    """A large static square (object 1) in front; a small square of the same green texture
    (object 2) slides left to right behind it, hidden at frames 12-18, out again from 19."""
    bg = np.random.default_rng(0).integers(90, 130, (H, W, 3)).astype(np.uint8)
    texture = np.random.default_rng(1).integers(0, 40, (H, W)).astype(np.int16)
    yy, xx = np.mgrid[0:H, 0:W]
    x_back = 20 + 4 * t
    image, label = bg.copy(), np.zeros((H, W), np.uint8)
    for oid, x, half in ((BACK, x_back, 8), (FRONT, 80, 20)):
        m = (abs(yy - 60) <= half) & (abs(xx - x) <= half)
        tex = np.roll(texture, x, axis=1)  # the texture moves with its object
        image[m] = np.stack([40 + tex, 170 + tex, 60 + tex], -1).clip(0, 255).astype(np.uint8)[m]
        label[m] = oid
    return image, label


def _track(order: bool, frames=range(1, 26)):
    """The tracker alone, each tracked object's committed mask its true mask (a perfect refiner)
    where the tracker put it on that object, else the tracker's own mask."""
    tracker = FlowTracker(occlusion_order=order)
    image, label = _scene(0)
    truth = {i: label == i for i in (FRONT, BACK)}
    tracker.add_objects(0, image, truth)
    tracker.commit(0, image, truth)
    tracker.store_memory(0)
    out = {}
    for t in frames:
        image, label = _scene(t)
        masks = tracker.track(t, image)
        out[t] = (masks, label, dict(tracker._behind))
        committed = {i: (label == i) if m.any() and (m & (label == i)).sum() > 0.5 * m.sum() else m
                     for i, m in masks.items()}
        tracker.commit(t, image, committed)
    return out


def test_reemerging_lookalike_keeps_its_pixels_with_occlusion_order():
    for t, (masks, label, _) in _track(True).items():
        back = label == BACK
        if t >= 20:  # from its second visible frame on, most of it is its own again; the occluder
            # keeps at most its slack (2 px) of it
            assert (masks[BACK] & back).sum() > 0.5 * back.sum(), t
            assert (masks[FRONT] & back).sum() <= 0.3 * back.sum(), t


def test_without_occlusion_order_the_occluder_grows_over_it():
    # The same scene without the option: what the option is for (the occluder takes the pixels
    # the hidden object uncovers, and the hidden object stays lost until it is free of it).
    run = _track(False)
    grown = [t for t in range(19, 23)
             if (run[t][0][FRONT] & (run[t][1] == BACK)).sum() > 0.5 * (run[t][1] == BACK).sum()]
    assert grown, "the scene no longer shows the occluder growing over the re-emerging object"


def test_depth_order_is_kept_while_hidden_and_forgotten_once_apart():
    run = _track(True)
    for t in range(12, 19):  # wholly hidden: object 2 is behind object 1
        assert run[t][2] == {BACK: FRONT}, (t, run[t][2])
    assert run[25][2] == {}, run[25][2]  # out and apart: no order kept


def test_removing_an_object_forgets_its_order():
    tracker = FlowTracker(occlusion_order=True)
    tracker._behind, tracker._covered = {BACK: FRONT}, {(FRONT, BACK): 40.0}
    tracker._objects = {FRONT: None, BACK: None}
    tracker.remove_objects([FRONT])
    assert tracker._behind == {} and tracker._covered == {}


def test_readme_demo_keeps_its_ids_with_the_default():
    # The README demo's scene through the default profile: look-alikes pass behind each other
    # (object 1 behind object 3 at frames 28-36) and come out; no identity switch.
    frames, labels = make_sequence("demo", 0, (640, 480), 150, 3)
    frames, labels = frames[:60], labels[:60]
    default = Path(__file__).resolve().parents[1] / "config" / "track.yaml"
    preds, _ = run_sequence(load_config(default), frames, labels)
    result = evaluate_sequence_arrays(preds, labels)
    assert result["id_switches"] == 0
    assert result["JF"] > 0.8


@pytest.mark.parametrize("value", [-1, 1.5])
def test_occluder_slack_must_be_a_whole_number_of_pixels(value):
    with pytest.raises(ValueError, match="occluder_slack"):
        FlowTracker(occluder_slack=value)
