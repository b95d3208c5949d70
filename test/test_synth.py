"""Synthetic scene generator: determinism, exact ground truth and the behaviours it must show."""
import itertools

import cv2
import numpy as np
import pytest

from hqsmem_ros.data import synth
from hqsmem_ros.eval import davis_io
from hqsmem_ros.eval.davis_io import DataError

SMALL = (160, 120)  # tests run the suite small; the behaviours are size-independent


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    names = synth.write_suite(out, seed=3, size=SMALL)
    return out, names


def suite_labels(out, name):
    return [davis_io.read_label(p) for p in davis_io.list_labels(out / "Annotations" / name)]


def file_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_other_seed_differs(small_suite, tmp_path):
    out, names = small_suite
    assert synth.write_suite(tmp_path / "again", seed=3, size=SMALL) == names
    first, again = file_bytes(out), file_bytes(tmp_path / "again")
    assert first.keys() == again.keys() and len(first) > 200
    assert all(first[k] == again[k] for k in first)
    frames_a, labels_a = synth.make_sequence("split", 3, size=SMALL, frames=5, n_objects=2)
    frames_b, labels_b = synth.make_sequence("split", 4, size=SMALL, frames=5, n_objects=2)
    assert not np.array_equal(frames_a[0], frames_b[0])
    assert not np.array_equal(labels_a[0], labels_b[0])


def test_suite_is_written_in_davis_layout(small_suite):
    out, names = small_suite
    assert names == [scenario for scenario, _, _ in synth.SUITE]
    found = davis_io.find_sequences(out)
    assert [s.name for s in found] == sorted(names)
    for seq in found:
        frames = davis_io.list_frames(seq.frames_dir)
        labels = davis_io.list_labels(seq.labels_dir)
        assert [p.stem for p in frames] == [p.stem for p in labels]
        assert frames[0].name == "00000.jpg" and 40 <= len(frames) <= 100
        image = davis_io.read_frame(frames[0])
        assert image.shape == (SMALL[1], SMALL[0], 3) and image.dtype == np.uint8


def test_written_labels_equal_the_generated_ground_truth(small_suite):
    out, _ = small_suite
    scenario, frames, n_objects = synth.SUITE[1]
    _, labels = synth.make_sequence(scenario, 3, size=SMALL, frames=frames, n_objects=n_objects)
    for written, generated in zip(suite_labels(out, scenario), labels):
        np.testing.assert_array_equal(written, generated)


def test_every_object_is_visible_in_the_first_frame_at_suite_size():
    for scenario, frames, n_objects in synth.SUITE:
        frame, label = next(synth.iter_frames(0, (640, 480), frames, n_objects, scenario))
        ids = set(np.unique(label).tolist()) - {0}
        assert ids == set(range(1, n_objects + 1)), scenario
        for obj in ids:
            pixels = frame[label == obj].astype(float)
            # Textured, not flat: flow and colour models need structure inside the object.
            assert pixels.std(axis=0).max() > 8, (scenario, obj)


def test_ground_truth_ids_per_sequence(small_suite):
    out, _ = small_suite
    for scenario, _, n_objects in synth.SUITE:
        labels = suite_labels(out, scenario)
        seen = set(np.unique(np.stack(labels)).tolist()) - {0}
        assert seen == set(range(1, n_objects + 1)), scenario


def test_object_leaves_and_reenters(small_suite):
    out, _ = small_suite
    present = [bool((label == 1).any()) for label in suite_labels(out, "leave_reenter")]
    assert present[0]
    first_absent = present.index(False)
    assert True in present[first_absent:]  # it comes back
    assert present.count(False) >= 5


def test_object_scales_and_is_occluded(small_suite):
    out, _ = small_suite
    areas = [np.count_nonzero(label == 1) for label in suite_labels(out, "translate_scale")]
    assert max(areas) > 2.5 * min(areas)
    # In rotate_occlude the objects keep their size; object 1 loses area only behind the others.
    labels = suite_labels(out, "rotate_occlude")
    areas_1 = [np.count_nonzero(label == 1) for label in labels]
    assert min(areas_1) < 0.7 * max(areas_1)


def test_split_object_has_two_pieces_later(small_suite):
    out, _ = small_suite
    labels = suite_labels(out, "split")
    pieces = [cv2.connectedComponents((label == 1).astype(np.uint8))[0] - 1 for label in labels]
    assert pieces[0] == 1
    assert all(n == 2 for n in pieces[-10:])


def centroid_x(label, obj):
    return float(np.nonzero(label == obj)[1].mean())


def test_identity_objects_look_alike(small_suite):
    frame, label = next(synth.iter_frames(3, (640, 480), 100, 3, "identity"))
    hsv = cv2.cvtColor(frame, cv2.COLOR_RGB2HSV_FULL)
    hues = []
    for obj in (1, 2, 3):
        h = hsv[..., 0][label == obj].astype(float) * 2 * np.pi / 256
        hues.append(np.angle(np.mean(np.exp(1j * h))))  # circular mean
    spread = max(abs(np.angle(np.exp(1j * (a - b)))) for a in hues for b in hues)
    assert spread < 2 * np.pi * 0.05  # within 18 degrees of each other
    # Other scenarios keep hues apart; here even the texture kind is shared (same mean colour).
    means = [frame[label == obj].astype(float).mean(axis=0) for obj in (1, 2, 3)]
    assert max(np.abs(a - b).max() for a in means for b in means) < 30


def test_identity_objects_cross_paths_overlapping(small_suite):
    out, _ = small_suite
    labels = suite_labels(out, "identity")
    order = [centroid_x(label, 1) < centroid_x(label, 2) for label in labels]
    flips = sum(a != b for a, b in zip(order, order[1:]))
    assert flips >= 2  # they trade sides and back
    areas_2 = [np.count_nonzero(label == 2) for label in labels]
    assert min(areas_2) < 0.1 * max(areas_2)  # object 2 passes (nearly) wholly behind object 1


def test_identity_object_hidden_30_frames_then_reappears(small_suite):
    out, _ = small_suite
    labels = suite_labels(out, "identity")
    present = [bool((label == 3).any()) for label in labels]
    assert present[0]
    first_absent = present.index(False)
    back = present.index(True, first_absent)
    assert back - first_absent >= 30
    # It hides behind an unlabelled pillar: that band is background in every label ...
    x0, x1 = (int(np.ceil(f * SMALL[0])) + 1 for f in synth.PILLAR_X)
    assert all(not label[:, x0 : x1 - 2].any() for label in labels)
    # ... and comes out on its far side.
    assert centroid_x(labels[back + 5], 3) > x1 - 2 > centroid_x(labels[0], 3)


def test_long_sequences_stream_lazily():
    stream = synth.iter_frames(1, SMALL, frames=10_000, n_objects=4, scenario="mixed")
    first = list(itertools.islice(stream, 3))
    assert len(first) == 3 and first[0][0].shape == (SMALL[1], SMALL[0], 3)
    assert set(np.unique(first[0][1]).tolist()) - {0} == {1, 2, 3, 4}


def test_bad_arguments_are_errors(tmp_path):
    with pytest.raises(ValueError, match="scenario"):
        next(synth.iter_frames(0, SMALL, 5, 2, "juggling"))
    with pytest.raises(ValueError, match="n_objects"):
        next(synth.iter_frames(0, SMALL, 5, 0, "mixed"))
    foreign = tmp_path / "JPEGImages" / "split"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="mine.txt"):
        synth.write_sequence(tmp_path, "split", 0, SMALL, frames=3, n_objects=2)
    assert (foreign / "mine.txt").exists()
