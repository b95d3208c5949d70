"""DAVIS and VOTS measures on hand-computed cases, and the DAVIS-layout reading and writing."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from hqsmem_ros.eval import davis_io, metrics
from hqsmem_ros.eval.davis_io import DataError


def box(shape, y0, y1, x0, x1):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def label_of(shape, *objects):
    """Label map from (id, mask) pairs, later ones on top."""
    label = np.zeros(shape, np.uint8)
    for obj, mask in objects:
        label[mask] = obj
    return label


# --------------------------------------------------------------------------------------------
# Per-frame measures


def test_jaccard_identical_disjoint_and_half_overlap():
    a = box((20, 30), 0, 10, 0, 10)
    assert metrics.jaccard(a, a) == 1.0
    assert metrics.jaccard(a, box((20, 30), 10, 20, 10, 20)) == 0.0
    # Shifted by half its width: intersection 50, union 150.
    assert metrics.jaccard(a, box((20, 30), 0, 10, 5, 15)) == pytest.approx(1 / 3)


def test_jaccard_empty_cases():
    empty, full = np.zeros((8, 8), bool), box((8, 8), 2, 5, 2, 5)
    assert metrics.jaccard(empty, empty) == 1.0
    assert metrics.jaccard(empty, full) == 0.0
    assert metrics.jaccard(full, empty) == 0.0


def test_boundary_map_marks_pixels_differing_from_right_lower_or_diagonal_neighbour():
    mask = np.zeros((5, 5), bool)
    mask[2, 2] = True
    expected = np.zeros((5, 5), bool)
    expected[1:3, 1:3] = True  # (2,2) itself, above (lower nbr), left (right nbr), upper-left (diagonal)
    np.testing.assert_array_equal(metrics.boundary_map(mask), expected)
    # The image border is not a boundary: a full mask has none.
    assert not metrics.boundary_map(np.ones((4, 6), bool)).any()


def test_boundary_f_tolerance_in_pixels():
    gt = np.zeros((20, 20), bool)
    gt[5, 5] = True  # boundary: rows 4-5, cols 4-5
    pred = np.zeros((20, 20), bool)
    pred[5, 8] = True  # boundary: rows 4-5, cols 7-8; nearest columns 2 apart
    assert metrics.boundary_f(pred, gt, bound_px=1) == 0.0
    # Radius 2: column 7 matches column 5 and vice versa: precision = recall = 1/2.
    assert metrics.boundary_f(pred, gt, bound_px=2) == pytest.approx(0.5)
    assert metrics.boundary_f(pred, gt, bound_px=3) == 1.0


def test_boundary_f_uses_a_disk_not_a_square():
    gt = np.zeros((20, 20), bool)
    gt[5, 5] = True  # boundary rows/cols 4-5
    pred = np.zeros((20, 20), bool)
    pred[7, 7] = True  # boundary rows/cols 6-7
    # Radius 2: only (6,6)-(5,5) are within the disk (offset (1,1)); (1,2) and (2,2) are not.
    # A square 5x5 window would match (6,7), (7,6), (7,7) too.
    assert metrics.boundary_f(pred, gt, bound_px=2) == pytest.approx(0.25)


def test_boundary_f_empty_cases_and_identical():
    empty, obj = np.zeros((30, 30), bool), box((30, 30), 5, 15, 5, 20)
    assert metrics.boundary_f(empty, empty) == 1.0
    assert metrics.boundary_f(obj, empty) == 0.0
    assert metrics.boundary_f(empty, obj) == 0.0
    assert metrics.boundary_f(obj, obj) == 1.0
    # Masks covering the whole image have no boundary pixels: both none -> 1, one none -> 0.
    full = np.ones((30, 30), bool)
    assert metrics.boundary_f(full, full) == 1.0
    assert metrics.boundary_f(full, obj) == 0.0


def test_default_tolerance_is_davis_8px_at_480p():
    assert metrics.boundary_tolerance((480, 854)) == 8
    assert metrics.boundary_tolerance((480, 640)) == math.ceil(0.008 * 800)
    assert metrics.boundary_tolerance((480, 854), 3) == 3


def test_boundary_f_default_tolerance_depends_on_image_size():
    # Squares 5 px apart: within the 8 px tolerance of an 854x480 image, not of a 64x48 one (1 px).
    big_gt, big_pred = box((480, 854), 100, 200, 100, 200), box((480, 854), 100, 200, 105, 205)
    assert metrics.boundary_f(big_pred, big_gt) == 1.0
    small_gt, small_pred = box((48, 64), 10, 30, 10, 30), box((48, 64), 10, 30, 15, 35)
    assert metrics.boundary_f(small_pred, small_gt) < 0.7


# --------------------------------------------------------------------------------------------
# DAVIS sequence statistics


def test_davis_decay_bins():
    assert metrics.davis_decay([1, 1, 1, 1, 0, 0, 0, 0, 0]) == pytest.approx(1.0)
    # 5 frames: bins [0,1] and [3,4] share edges with the middle bins.
    assert metrics.davis_decay([1, 0.5, 0.5, 0.5, 0]) == pytest.approx(0.75 - 0.25)
    # 3 frames: edges round(0, .5, 1, 1.5, 2) with halves up = 0,1,1,2,2: first bin [v0, v1], last [v2].
    assert metrics.davis_decay([1.0, 0.0, 0.4]) == pytest.approx(0.5 - 0.4)


def test_davis_excludes_first_and_last_frame():
    shape = (20, 20)
    gt = box(shape, 5, 15, 0, 10)
    half = box(shape, 5, 15, 5, 15)  # IoU 1/3 with gt
    gts = [label_of(shape, (1, gt))] * 5
    preds = [np.zeros(shape, np.uint8),  # first frame: excluded (it is the given mask)
             label_of(shape, (1, gt)), label_of(shape, (1, half)), label_of(shape, (1, gt)),
             np.zeros(shape, np.uint8)]  # last frame: excluded
    result = metrics.evaluate_sequence_arrays(preds, gts)
    assert result["n_davis_frames"] == 3
    assert result["J"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert result["J_recall"] == pytest.approx(2 / 3)
    assert result["JF"] == pytest.approx((result["J"] + result["F"]) / 2)
    # VOTS counts every frame, the first included: 2 misses (M) among 5 present frames.
    assert result["objects"][1]["n_M"] == 2
    assert result["Rob"] == pytest.approx(3 / 5)


def test_davis_object_absent_in_gt_and_prediction_scores_one():
    shape = (10, 10)
    a = label_of(shape, (1, box(shape, 0, 4, 0, 4)), (2, box(shape, 6, 9, 6, 9)))
    only_1 = label_of(shape, (1, box(shape, 0, 4, 0, 4)))
    # Object 2 leaves in frames 1-2 and the prediction leaves it out too: J = F = 1 there.
    result = metrics.evaluate_sequence_arrays([a, only_1, only_1, a], [a, only_1, only_1, a])
    assert result["objects"][2]["J"] == 1.0 and result["objects"][2]["F"] == 1.0


# --------------------------------------------------------------------------------------------
# VOTS


def test_vots_classification_and_measures():
    shape = (20, 20)
    target = box(shape, 5, 15, 0, 10)
    half = box(shape, 5, 15, 5, 15)  # IoU 1/3
    elsewhere = box(shape, 0, 3, 15, 20)  # no overlap
    empty = np.zeros(shape, np.uint8)
    gts = [label_of(shape, (1, target))] * 4 + [empty, empty, None]
    preds = [
        label_of(shape, (1, target)),  # T, overlap 1
        label_of(shape, (1, half)),  # T, overlap 1/3
        empty,  # M
        label_of(shape, (1, elsewhere)),  # F
        empty,  # N
        label_of(shape, (1, elsewhere)),  # H
        label_of(shape, (1, elsewhere)),  # unknown ground truth: skipped
    ]
    result = metrics.evaluate_sequence_arrays(preds, gts)
    obj = result["objects"][1]
    assert (obj["n_T"], obj["n_M"], obj["n_F"], obj["n_N"], obj["n_H"]) == (2, 1, 1, 1, 1)
    assert result["n_frames"] == 6
    assert result["Q"] == pytest.approx((1 + 1 / 3 + 0 + 0 + 1 + 0) / 6)
    assert result["Acc"] == pytest.approx((1 + 1 / 3) / 2)
    assert result["Rob"] == pytest.approx(2 / 4)
    assert result["NRE"] == pytest.approx(1 / 4)
    assert result["DRE"] == pytest.approx(1 / 4)
    assert math.isnan(result["ADQ"])  # only 2 absent frames


@pytest.mark.parametrize("n_absent, expect_adq", [(10, False), (11, True)])
def test_vots_adq_only_with_more_than_10_absent_frames(n_absent, expect_adq):
    shape = (12, 12)
    target = label_of(shape, (1, box(shape, 2, 8, 2, 8)))
    empty = np.zeros(shape, np.uint8)
    gts = [target] + [empty] * n_absent
    n_hallucinated = 3
    preds = [target] + [target] * n_hallucinated + [empty] * (n_absent - n_hallucinated)
    result = metrics.evaluate_sequence_arrays(preds, gts)
    if expect_adq:
        assert result["ADQ"] == pytest.approx((n_absent - n_hallucinated) / n_absent)
    else:
        assert math.isnan(result["ADQ"])
    assert result["Q"] == pytest.approx((1 + n_absent - n_hallucinated) / (1 + n_absent))


def test_vots_accuracy_without_tracked_frames_is_zero():
    shape = (10, 10)
    target = label_of(shape, (1, box(shape, 0, 5, 0, 5)))
    result = metrics.evaluate_sequence_arrays([np.zeros(shape, np.uint8)] * 3, [target] * 3)
    assert result["Acc"] == 0.0 and result["Rob"] == 0.0 and result["NRE"] == 1.0


def test_prediction_size_mismatch_is_an_error():
    with pytest.raises(DataError, match="00000"):
        metrics.evaluate_sequence_arrays([np.zeros((10, 12), np.uint8)], [np.zeros((10, 10), np.uint8)])


# --------------------------------------------------------------------------------------------
# Folder evaluation


# --------------------------------------------------------------------------------------------
# Identity switches

ID_SHAPE = (20, 40)


def two_objects(left_id, right_id, shape=ID_SHAPE):
    """Two 8x8 squares: `left_id` on the left, `right_id` on the right (0 leaves one out)."""
    objects = [(i, m) for i, m in ((left_id, box(shape, 6, 14, 4, 12)), (right_id, box(shape, 6, 14, 28, 36))) if i]
    return label_of(shape, *objects)


def crossing(n_frames, swap_at=None):
    """Objects 1 and 2 trade places; the prediction swaps their ids from frame `swap_at` on."""
    gts, preds = [], []
    for k in range(n_frames):
        x1 = 4 + 4 * k  # object 1 walks right over object 2, which walks left
        x2 = 28 - 4 * k
        gt = label_of(ID_SHAPE, (2, box(ID_SHAPE, 6, 14, x2, x2 + 8)), (1, box(ID_SHAPE, 6, 14, x1, x1 + 8)))
        pred = gt.copy()
        if swap_at is not None and k >= swap_at:
            pred = np.where(gt == 1, 2, np.where(gt == 2, 1, 0)).astype(np.uint8)
        gts.append(gt)
        preds.append(pred)
    return preds, gts


def test_associate_when_the_overlap_is_most_of_one_and_a_tenth_of_the_other():
    gt = label_of(ID_SHAPE, (1, box(ID_SHAPE, 0, 10, 0, 10)), (2, box(ID_SHAPE, 0, 10, 20, 30)))
    pred = label_of(ID_SHAPE, (5, box(ID_SHAPE, 0, 10, 0, 6)),  # 60 % of object 1, all of id 5
                    (2, box(ID_SHAPE, 0, 20, 20, 25)))  # exactly half of object 2 and of id 2
    assert metrics.associate(pred, gt) == [(1, 5)]
    assert metrics.associate(pred, gt, majority=0.4) == [(1, 5), (2, 2)]
    assert metrics.associate(np.zeros_like(gt), gt) == []
    # An id wholly on a fifth of an object is associated with it ...
    part = label_of(ID_SHAPE, (3, box(ID_SHAPE, 0, 2, 20, 30)))
    assert metrics.associate(part, gt) == [(2, 3)]
    # ... crumbs under a tenth of it are not ...
    crumb = label_of(ID_SHAPE, (3, box(ID_SHAPE, 0, 1, 20, 29)))
    assert metrics.associate(crumb, gt) == []
    # ... and an id covering all of object 2 and three times as much background is.
    cover = label_of(ID_SHAPE, (4, box(ID_SHAPE, 0, 20, 16, 36)))
    assert metrics.associate(cover, gt) == [(2, 4)]
    assert metrics.associate(cover, gt, min_share=0.3) == []
    # 16-bit predicted ids cost no table of id x id.
    wide = pred.astype(np.uint16)
    wide[wide == 5] = 60000
    assert metrics.associate(wide, gt) == [(1, 60000)]


def test_an_id_spreading_over_a_returning_object_is_a_switch():
    """The identity family's failure: object 2 comes out from behind object 1 and id 1 grows over
    it (one id on both objects); a small bleed at the crossing before is not counted."""
    gts = [two_objects(1, 2), two_objects(1, 2), two_objects(1, 0), two_objects(1, 2)]
    bleed = label_of(ID_SHAPE, (1, box(ID_SHAPE, 6, 14, 4, 12)), (1, box(ID_SHAPE, 6, 9, 28, 30)),
                     (2, box(ID_SHAPE, 9, 14, 28, 36)))  # 6 pixels of object 2 are id 1
    both = label_of(ID_SHAPE, (1, box(ID_SHAPE, 6, 14, 4, 12)), (1, box(ID_SHAPE, 6, 14, 28, 36)))
    res = metrics.evaluate_sequence_arrays([gts[0], bleed, gts[2], both], gts)
    assert res["id_switch_events"] == [["00003", 2, 1]]


def test_crossing_objects_keeping_their_ids_have_no_switch():
    preds, gts = crossing(7)
    res = metrics.evaluate_sequence_arrays(preds, gts)
    assert res["id_switches"] == 0 and res["id_switch_events"] == []
    assert res["JF"] == pytest.approx(1.0)


def test_swap_between_two_crossing_objects_counts_two():
    preds, gts = crossing(7, swap_at=5)  # after they passed each other (frame 3), ids swapped
    res = metrics.evaluate_sequence_arrays(preds, gts)
    assert res["id_switches"] == 2
    assert res["id_switch_events"] == [["00005", 1, 2], ["00005", 2, 1]]
    assert res["objects"][1]["id_switches"] == 1 and res["objects"][2]["id_switches"] == 1


def test_occlusion_that_comes_back_with_its_own_id_is_no_switch():
    gts = [two_objects(1, 2)] * 2 + [two_objects(1, 0)] * 30 + [two_objects(1, 2)] * 3
    preds = [two_objects(1, 2)] * 2 + [two_objects(1, 0)] * 30 + [two_objects(1, 2)] * 3
    assert metrics.evaluate_sequence_arrays(preds, gts)["id_switches"] == 0


def test_occlusion_that_comes_back_as_another_id_is_one_switch_and_turning_back_is_not_counted():
    gts = [two_objects(1, 2)] * 2 + [two_objects(1, 0)] * 30 + [two_objects(1, 2)] * 4
    # Object 2 re-appears labelled 1 (the tracker moved id 1 over; object 1 is lost meanwhile),
    # is lost for a frame, stays wrong, then gets its own id back.
    back_wrong = two_objects(0, 1)
    preds = ([two_objects(1, 2)] * 2 + [two_objects(1, 0)] * 30
             + [back_wrong, two_objects(1, 0), back_wrong, two_objects(1, 2)])
    res = metrics.evaluate_sequence_arrays(preds, gts)
    assert res["id_switch_events"] == [["00032", 2, 1]]
    assert res["id_switches"] == 1


def test_lost_object_picked_up_under_a_new_id_is_a_switch_and_chains_count_each_change():
    gts = [two_objects(1, 2)] * 5
    preds = [two_objects(1, 2), two_objects(1, 0), two_objects(1, 7), two_objects(1, 9), two_objects(1, 9)]
    res = metrics.evaluate_sequence_arrays(preds, gts)
    assert res["id_switch_events"] == [["00002", 2, 7], ["00003", 2, 9]]


def test_an_id_moving_onto_part_of_another_object_is_a_switch():
    """The demo's failure: object 1 is hidden behind object 3 and its id stays on a piece of
    object 3, which keeps its own id on the rest; object 1 comes back unlabelled."""
    shape = (20, 40)
    obj3 = box(shape, 4, 16, 10, 30)
    piece = box(shape, 4, 16, 10, 15)  # a quarter of object 3
    gts = [label_of(shape, (1, box(shape, 4, 16, 0, 8)), (3, obj3)), label_of(shape, (3, obj3)),
           label_of(shape, (3, obj3)), label_of(shape, (1, box(shape, 4, 16, 32, 40)), (3, obj3))]
    crumb = box(shape, 4, 5, 32, 34)  # 2 pixels of id 2 on the returning object 1: not counted
    preds = [gts[0], label_of(shape, (3, obj3), (1, piece)), label_of(shape, (3, obj3), (1, piece)),
             label_of(shape, (3, obj3), (1, piece), (2, crumb))]
    res = metrics.evaluate_sequence_arrays(preds, gts)
    assert res["id_switch_events"] == [["00001", 3, 1]]
    assert res["objects"][3]["id_switches"] == 1 and res["objects"][1]["id_switches"] == 0


def test_the_same_wrong_pair_is_counted_once():
    preds, gts = crossing(7, swap_at=2)
    preds[4] = gts[4]  # swapped, back, swapped again: still the pairs (1, 2) and (2, 1)
    assert metrics.evaluate_sequence_arrays(preds, gts)["id_switches"] == 2


def test_switches_are_summed_over_sequences_and_shown_in_the_table(tmp_path):
    preds, gts = crossing(7, swap_at=5)
    write_sequence(tmp_path / "gt" / "swapped", gts)
    write_sequence(tmp_path / "pred" / "swapped", preds)
    good_preds, good_gts = crossing(7)
    write_sequence(tmp_path / "gt" / "kept", good_gts)
    write_sequence(tmp_path / "pred" / "kept", good_preds)
    result = metrics.evaluate(tmp_path / "pred", tmp_path / "gt")
    assert result["sequences"]["swapped"]["id_switches"] == 2
    assert result["sequences"]["kept"]["id_switches"] == 0
    assert result["id_switches"] == 2
    lines = metrics.format_table(result).splitlines()
    assert "IDsw" in lines[0]
    column = lines[0].index("IDsw") + len("IDsw")
    rows = {line.split()[0]: line for line in lines[2:6] if line.split()}
    assert rows["swapped"][column - 1] == "2" and rows["kept"][column - 1] == "0" and rows["mean"][column - 1] == "2"


def test_demo_scoring_prints_identity_switches(tmp_path, capsys):
    from hqsmem_ros.tools import demo

    preds, gts = crossing(7, swap_at=5)
    truth = tmp_path / "truth"
    write_sequence(truth / "labels", gts)
    stamps = [1_000_000_000 + 33_000_000 * k for k in range(len(gts))]
    (truth / "stamps.csv").write_text("frame,stamp_ns\n" + "".join(f"{k},{s}\n" for k, s in enumerate(stamps)))
    by_stamp = tmp_path / "labels_by_stamp"
    for stamp, pred in zip(stamps, preds):
        davis_io.write_label(by_stamp / f"{stamp}.png", pred)
    scores = tmp_path / "scores.json"
    assert demo.main(["--truth", str(truth), "--labels", str(by_stamp), "--pred", str(tmp_path / "pred"),
                      "--json", str(scores)]) == 0
    assert "identity switches = 2" in capsys.readouterr().out
    assert json.loads(scores.read_text())["id_switches"] == 2


def write_sequence(folder, labels):
    for k, label in enumerate(labels):
        davis_io.write_label(folder / f"{k:05d}.png", label)


def test_evaluate_folders_averages_per_object_then_sequence_then_overall(tmp_path):
    shape = (16, 16)
    two = label_of(shape, (1, box(shape, 0, 6, 0, 6)), (2, box(shape, 9, 15, 9, 15)))
    one = label_of(shape, (1, box(shape, 3, 12, 3, 12)))
    only_first = label_of(shape, (1, box(shape, 0, 6, 0, 6)))
    write_sequence(tmp_path / "gt" / "seq_a", [two] * 4)
    write_sequence(tmp_path / "gt" / "seq_b", [one] * 4)
    write_sequence(tmp_path / "pred" / "seq_a", [only_first] * 4)  # object 2 never found
    write_sequence(tmp_path / "pred" / "seq_b", [one] * 4)
    result = metrics.evaluate(tmp_path / "pred", tmp_path / "gt")
    assert set(result["sequences"]) == {"seq_a", "seq_b"}
    assert result["sequences"]["seq_a"]["J"] == pytest.approx(0.5)
    assert result["sequences"]["seq_a"]["Q"] == pytest.approx(0.5)
    # Per sequence first: (0.5 + 1) / 2, not the per-object mean 2/3.
    for key in ("J", "F", "JF", "Q"):
        assert result[key] == pytest.approx(0.75)
    assert result["Rob"] == pytest.approx(0.75)
    assert result["missing_predictions"] == 0 and result["warnings"] == []
    table = metrics.format_table(result)
    assert "seq_a" in table and "0.750" in table


def test_evaluate_counts_missing_prediction_files_as_empty(tmp_path):
    shape = (16, 16)
    label = label_of(shape, (1, box(shape, 2, 10, 2, 10)))
    write_sequence(tmp_path / "gt" / "clip", [label] * 5)
    write_sequence(tmp_path / "pred" / "clip", [label] * 5)
    (tmp_path / "pred" / "clip" / "00002.png").unlink()
    result = metrics.evaluate(tmp_path / "pred", tmp_path / "gt")
    assert result["missing_predictions"] == 1
    assert any("00002" in w for w in result["warnings"])
    seq = result["sequences"]["clip"]
    assert seq["missing_frames"] == ["00002"]
    assert seq["J"] == pytest.approx(2 / 3)  # frames 1-3 scored, frame 2 empty
    assert seq["objects"][1]["n_M"] == 1
    assert "warning" in metrics.format_table(result)


def test_evaluate_sequence_without_prediction_folder_is_reported(tmp_path):
    shape = (8, 8)
    label = label_of(shape, (1, box(shape, 2, 6, 2, 6)))
    write_sequence(tmp_path / "gt" / "a", [label] * 3)
    write_sequence(tmp_path / "gt" / "b", [label] * 3)
    write_sequence(tmp_path / "pred" / "a", [label] * 3)
    result = metrics.evaluate(tmp_path / "pred", tmp_path / "gt")
    assert result["missing_predictions"] == 3
    assert result["sequences"]["b"]["J"] == 0.0
    assert any("b:" in w and "no prediction folder" in w for w in result["warnings"])


def test_evaluate_single_sequences_and_davis_root_layout(tmp_path):
    shape = (8, 8)
    label = label_of(shape, (1, box(shape, 2, 6, 2, 6)))
    # DAVIS root GT (Annotations/<seq>) against a bare folder of PNGs with another name.
    write_sequence(tmp_path / "davis" / "Annotations" / "cows", [label] * 3)
    write_sequence(tmp_path / "out", [label] * 3)
    result = metrics.evaluate(tmp_path / "out", tmp_path / "davis")
    assert list(result["sequences"]) == ["cows"] and result["J"] == 1.0
    # Shared layout: <seq>/Annotations/*.png.
    write_sequence(tmp_path / "shared" / "cows" / "Annotations", [label] * 3)
    result = metrics.evaluate(tmp_path / "out", tmp_path / "shared" / "cows")
    assert result["J"] == 1.0 and result["Q"] == 1.0


def test_evaluate_size_mismatch_names_the_file(tmp_path):
    write_sequence(tmp_path / "gt" / "s", [np.zeros((8, 8), np.uint8)] * 2)
    write_sequence(tmp_path / "pred" / "s", [np.zeros((8, 9), np.uint8)] * 2)
    with pytest.raises(DataError, match=r"pred.s.00000\.png"):
        metrics.evaluate(tmp_path / "pred", tmp_path / "gt")


# --------------------------------------------------------------------------------------------
# DAVIS-layout I/O


def test_label_roundtrip_palette_and_16_bit(tmp_path):
    small = np.array([[0, 1, 2], [255, 7, 0]], np.uint8)
    davis_io.write_label(tmp_path / "a.png", small)
    with Image.open(tmp_path / "a.png") as image:
        assert image.mode == "P"
    np.testing.assert_array_equal(davis_io.read_label(tmp_path / "a.png"), small)
    large = np.array([[0, 300], [65535, 2]], np.uint16)
    davis_io.write_label(tmp_path / "b.png", large)
    read = davis_io.read_label(tmp_path / "b.png")
    assert read.dtype == np.uint16
    np.testing.assert_array_equal(read, large)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temporary files left


def test_read_label_davis2016_binary_is_object_one(tmp_path):
    binary = np.zeros((4, 4), np.uint8)
    binary[1:3, 1:3] = 255
    Image.fromarray(binary, mode="L").save(tmp_path / "m.png")
    np.testing.assert_array_equal(davis_io.read_label(tmp_path / "m.png"), (binary == 255).astype(np.uint8))
    ids = np.array([[0, 1], [2, 3]], np.uint8)
    Image.fromarray(ids, mode="L").save(tmp_path / "ids.png")
    np.testing.assert_array_equal(davis_io.read_label(tmp_path / "ids.png"), ids)


def test_read_label_rgb_davis_colours(tmp_path):
    ids = np.array([[0, 1], [2, 3]], np.uint8)
    rgb = davis_io.davis_palette()[ids]
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "c.png")
    np.testing.assert_array_equal(davis_io.read_label(tmp_path / "c.png"), ids)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "bad.png")
    with pytest.raises(DataError, match="bad.png"):
        davis_io.read_label(tmp_path / "bad.png")


def test_write_label_failure_leaves_no_file(tmp_path, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        davis_io.write_label(tmp_path / "x.png", np.zeros((4, 4), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_write_label_rejects_bad_arrays(tmp_path):
    with pytest.raises(DataError, match="x.png"):
        davis_io.write_label(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="x.png"):
        davis_io.write_label(tmp_path / "x.png", np.zeros((4, 4), np.float32))
    assert not (tmp_path / "x.png").exists()


def test_list_frames_sorted_and_strict(tmp_path):
    for name in ("00002.jpg", "00000.jpg", "00001.png", ".DS_Store"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in davis_io.list_frames(tmp_path)] == ["00000.jpg", "00001.png", "00002.jpg"]
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt"):
        davis_io.list_frames(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        davis_io.list_frames(empty)


def test_corrupt_files_are_errors_naming_the_file(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="broken.jpg"):
        davis_io.read_frame(tmp_path / "broken.jpg")
    with pytest.raises(DataError, match="broken.png"):
        davis_io.read_label(tmp_path / "broken.png")
    with pytest.raises(DataError, match="missing.png"):
        davis_io.read_label(tmp_path / "missing.png")


def test_read_frame_is_rgb(tmp_path):
    image = np.zeros((6, 8, 3), np.uint8)
    image[..., 0] = 200  # red
    davis_io.write_frame(tmp_path / "f.png", image)
    frame = davis_io.read_frame(tmp_path / "f.png")
    assert frame.shape == (6, 8, 3) and frame.dtype == np.uint8
    np.testing.assert_array_equal(frame, image)


def test_find_sequences_layouts(tmp_path):
    label = np.zeros((4, 4), np.uint8)
    frame = np.zeros((4, 4, 3), np.uint8)
    # DAVIS root with a resolution level.
    for seq in ("bear", "cows"):
        davis_io.write_frame(tmp_path / "davis" / "JPEGImages" / "480p" / seq / "00000.jpg", frame)
        davis_io.write_label(tmp_path / "davis" / "Annotations" / "480p" / seq / "00000.png", label)
    found = davis_io.find_sequences(tmp_path / "davis")
    assert [s.name for s in found] == ["bear", "cows"]
    assert found[0].frames_dir == tmp_path / "davis" / "JPEGImages" / "480p" / "bear"
    assert found[0].labels_dir == tmp_path / "davis" / "Annotations" / "480p" / "bear"
    # Folder of sequences in the shared layout, with a README beside them.
    for seq in ("x", "y"):
        davis_io.write_frame(tmp_path / "shared" / seq / "JPEGImages" / "00000.jpg", frame)
        davis_io.write_label(tmp_path / "shared" / seq / "Annotations" / "00000.png", label)
    (tmp_path / "shared" / "SOURCES.md").write_text("where the data came from")
    assert sorted(davis_io.find_label_sequences(tmp_path / "shared")) == ["x", "y"]
    # A folder that is neither is an error naming it.
    (tmp_path / "shared" / "junk").mkdir()
    with pytest.raises(DataError, match="junk"):
        davis_io.find_sequences(tmp_path / "shared")
