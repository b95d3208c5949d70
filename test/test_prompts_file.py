"""The prompts file (hqsmem_ros/io/prompts_file.py, docs/prompts.md): parsing, timing, errors that
name the file and the entry. ROS-free."""
import numpy as np
import pytest

from hqsmem_ros.eval.davis_io import write_label
from hqsmem_ros.io.prompts_file import PromptsFileError, load_prompts_file


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_entries_and_their_times(tmp_path):
    label = np.zeros((40, 50), np.uint8)
    label[5:15, 5:20] = 3
    label[20:30, 30:45] = 8
    (tmp_path / "m").mkdir()
    write_label(tmp_path / "m" / "l.png", label)
    binary = (label == 8).astype(np.uint8) * 255
    write_label(tmp_path / "m" / "b.png", binary)
    path = write(tmp_path, """
version: 1
prompts:
  - {id: 3, frame: 0, mask: m/l.png, label: cup}            # mask_value defaults to the id
  - {id: 4, stamp: 1700000000.123456789, mask: m/l.png, mask_value: 8, box: [1, 2, 30, 40]}
  - {id: 9, stamp: {sec: 1700000001, nanosec: 5}, mask: m/b.png}   # binary mask: its one value
  - {id: 5, frame: 2, box: [1.5, 2, 10, 12.25]}
remove:
  - {ids: [3, 5], frame: 7}
""")
    sched = load_prompts_file(path)
    assert len(sched.entries) == 5
    e = sched.entries
    assert (e[0].frame, e[0].labels) == (0, {3: "cup"})
    assert np.array_equal(e[0].prompts[0].mask, label == 3)
    assert e[1].stamp_ns == 1_700_000_000_123_456_789  # exact, not through a binary float
    assert np.array_equal(e[1].prompts[0].mask, label == 8) and e[1].prompts[0].box == (1, 2, 30, 40)
    assert e[2].stamp_ns == 1_700_000_001_000_000_005
    assert np.array_equal(e[2].prompts[0].mask, label == 8)
    assert e[3].prompts[0].box == (1.5, 2.0, 10.0, 12.25) and e[3].prompts[0].mask is None
    assert e[4].remove == [3, 5] and e[4].frame == 7

    # Due at or after their time; an image exactly on the stamp gets it, one nanosecond before does not.
    assert [x.source.split(": ")[1] for x in sched.due(0, 1_700_000_000_123_456_788)] == ["prompts[0] (id 3)"]
    assert [x.prompts[0].id for x in sched.due(0, 1_700_000_000_123_456_789)] == [3, 4]
    due = sched.due(2, 1_700_000_000_200_000_000)
    assert [x.prompts[0].id for x in due] == [3, 4, 5]
    prompts, remove, labels = sched.prompts_for(due, (40, 50))
    assert [p.id for p in prompts] == [3, 4, 5] and remove == [] and labels == {3: "cup"}
    sched.mark_applied(due)
    assert sched.due(3, 1_700_000_000_300_000_000) == []
    assert [x.frame for x in sched.due(9, 1_700_000_000_300_000_000)] == [7]
    assert len(sched.pending()) == 2  # id 9's stamp and the removal are still to come
    with pytest.raises(PromptsFileError, match=r"p.yaml: prompts\[0\] \(id 3\): mask is 50x40 but the image at frame 0 is 60x40"):
        sched.prompts_for(sched.entries[:1], (40, 60))


@pytest.mark.parametrize("text,needle", [
    ("prompts: [{id: 1, box: [0, 0, 5, 5]}]", r"prompts\[0\] \(id 1\): give exactly one of 'frame'"),
    ("prompts: [{id: 1, frame: 0, stamp: 3, box: [0, 0, 5, 5]}]", r"exactly one of 'frame'"),
    ("prompts: [{id: 0, frame: 0, box: [0, 0, 5, 5]}]", r"prompts\[0\]: id must be an integer in 1..65535, got 0"),
    ("prompts: [{id: 70000, frame: 0, box: [0, 0, 5, 5]}]", r"id must be an integer in 1..65535"),
    ("prompts: [{frame: 0, box: [0, 0, 5, 5]}]", r"prompts\[0\]: missing 'id'"),
    ("prompts: [{id: 2, frame: 0}]", r"prompts\[0\] \(id 2\): give a 'box', a 'mask' file and/or 'points'"),
    ("prompts: [{id: 2, frame: 0, negative_points: [[3, 4]]}]", r"and/or 'points' on the object"),
    ("prompts: [{id: 2, frame: 0, points: [[3, 4, 5]]}]", r"points must be a list of \[x, y\] pixel pairs"),
    ("prompts: [{id: 2, frame: 0, points: [3, 4]}]", r"points must be a list of \[x, y\] pixel pairs"),
    ("prompts: [{id: 2, frame: 0, box: [5, 5, 5, 9]}]", r"box \[5.0, 5.0, 5.0, 9.0\] is empty"),
    ("prompts: [{id: 2, frame: 0, box: [1, 2, 3]}]", r"box must be \[x_min, y_min, x_max, y_max\]"),
    ("prompts: [{id: 2, frame: -1, box: [0, 0, 5, 5]}]", r"frame must be an integer >= 0"),
    ("prompts: [{id: 2, stamp: 1.0000000001, box: [0, 0, 5, 5]}]", r"more than 9 decimals"),
    ("prompts: [{id: 2, stamp: {sec: 1, nanosec: 2000000000}, box: [0, 0, 5, 5]}]", r"nanosec: 0..999999999"),
    ("prompts: [{id: 2, frame: 0, mask: nope.png}]", r"prompts\[0\] \(id 2\): mask file not found: .*nope.png"),
    ("prompts: [{id: 2, frame: 0, box: [0, 0, 5, 5], colour: red}]", r"unknown key\(s\) colour"),
    ("prompts: [{id: 2, frame: 0, box: [0, 0, 5, 5], label: 5}]", r"label must be text"),
    ("prompts: [{id: 2, frame: 0, box: [0, 0, 5, 5]}, {id: 2, frame: 0, box: [1, 1, 5, 5]}]",
     r"prompts\[1\] \(id 2\) and prompts\[0\] \(id 2\) both concern object 2 at frame 0"),
    ("remove: [{id: 2, ids: [3], frame: 1}]", r"remove\[0\]: give exactly one of 'id' or 'ids'"),
    ("remove: [{ids: [3, 3], frame: 1}]", r"an id appears twice"),
    ("objects: []", r"unknown key\(s\) objects; known: version, prompts, remove"),
    ("prompts: {id: 1}", r"'prompts' must be a list"),
    ("version: 2\nprompts: []", r"version 2 is not supported"),
    ("prompts: []", r"no entries"),
    ("- just a list", r"expected a mapping"),
    ("prompts: [{id: 1, frame: 0, box: [0, 0, 5, 5]", r"not valid YAML"),
])
def test_errors_name_the_file_and_the_entry(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(PromptsFileError, match=needle) as info:
        load_prompts_file(path)
    assert str(path) in str(info.value)


def test_mask_value_errors(tmp_path):
    label = np.zeros((20, 20), np.uint8)
    label[2:8, 2:8] = 1
    label[10:15, 10:15] = 2
    write_label(tmp_path / "l.png", label)
    path = write(tmp_path, "prompts: [{id: 7, frame: 0, mask: l.png}]")
    with pytest.raises(PromptsFileError, match=r"l.png has no pixel equal to 7 \(values present: \[1, 2\]\); set mask_value"):
        load_prompts_file(path)
    path = write(tmp_path, "prompts: [{id: 7, frame: 0, mask: l.png, mask_value: 2}]")
    assert load_prompts_file(path).entries[0].prompts[0].mask.sum() == 25
    (tmp_path / "bad.png").write_bytes(b"not a png")
    path = write(tmp_path, "prompts: [{id: 7, frame: 0, mask: bad.png}]")
    with pytest.raises(PromptsFileError, match=r"prompts\[0\] \(id 7\): cannot read label image"):
        load_prompts_file(path)
    with pytest.raises(PromptsFileError, match="prompts file not found"):
        load_prompts_file(tmp_path / "missing.yaml")


def test_clicks_with_and_without_a_box(tmp_path):
    path = write(tmp_path, """
prompts:
  - {id: 1, frame: 0, points: [[10, 12.5], [20, 14]], negative_points: [[30, 5]]}
  - {id: 2, frame: 0, box: [1, 1, 9, 9], negative_points: [[8, 8]]}
""")
    sched = load_prompts_file(path)
    prompts, _, _ = sched.prompts_for(sched.due(0, None), (40, 50))
    assert prompts[0].points == [(10.0, 12.5, 1), (20.0, 14.0, 1), (30.0, 5.0, 0)] and prompts[0].box is None
    assert prompts[1].points == [(8.0, 8.0, 0)] and prompts[1].box == (1, 1, 9, 9)
    with pytest.raises(PromptsFileError, match=r"prompts\[0\] \(id 1\): point \[30, 5\] is outside the 25x20 image"):
        sched.prompts_for(sched.entries[:1], (20, 25))
