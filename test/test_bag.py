"""`hqsmem bag` on real rosbag2 files written here with `rosbags` (mcap and sqlite3, Image and
CompressedImage): one masks and one objects message per image, stamps, ids, determinism, prompts
(file and recorded topic) and bad input."""
import json
import shutil

import cv2
import numpy as np
import pytest

from rosbags.rosbag2 import Reader, StoragePlugin, Writer  # a test dependency (setup.py extras "test")

from hqsmem_ros.bag import make_typestore, read_outputs, verify_outputs
from hqsmem_ros.cli import main
from hqsmem_ros.core.pipeline import HQSMemPipeline, ObjectPrompt
from hqsmem_ros.data.synth import make_sequence
from hqsmem_ros.tools.synth_bag import DEFAULT_START_NS, image_message, prompt_array_message, write_synthetic_bag
from hqsmem_ros.eval.davis_io import write_label
from hqsmem_ros.io import image_codec

SIZE = (160, 120)
FRAMES = 20
TOPIC = "/camera/image_raw"
PERIOD = 33_333_333


def hqsmem(capsys, *args):
    """Run the CLI in this process; returns (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def bag_images(bag):
    """[(bag time, header stamp ns)] of the image topic."""
    store = make_typestore()
    with Reader(bag) as reader:
        conns = [c for c in reader.connections if c.topic == TOPIC]
        return [(t, (m := store.deserialize_cdr(raw, c.msgtype)).header.stamp.sec * 10**9 + m.header.stamp.nanosec)
                for c, t, raw in reader.messages(connections=conns)]


def stamp_ns(msg):
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


def all_raw(bag):
    with Reader(bag) as reader:
        return [(c.topic, t, bytes(raw)) for c, t, raw in reader.messages()]


def write_frames_bag(path, frames, storage="mcap", image_format="rgb8", stamps=None, extra=()):
    """A bag of the given RGB frames (or raw bytes for a corrupt CompressedImage) on TOPIC.

    `stamps`: header stamps (default: 30 Hz); bag time is always 30 Hz from the first stamp.
    `extra`: [(topic, msgtype, bag time, message)] written too.
    """
    store = make_typestore()
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    bag_times = [DEFAULT_START_NS + k * PERIOD for k in range(len(frames))]
    stamps = stamps or bag_times
    with Writer(path, version=8, storage_plugin=plugin) as writer:
        msgtype = "sensor_msgs/msg/CompressedImage" if image_format in ("jpeg", "png") else "sensor_msgs/msg/Image"
        conn = writer.add_connection(TOPIC, msgtype, typestore=store)
        others = {}
        for topic, mtype, _, _ in extra:
            if topic not in others:
                others[topic] = writer.add_connection(topic, mtype, typestore=store)
        pending = sorted(extra, key=lambda e: e[2])
        for frame, stamp, bag_time in zip(frames, stamps, bag_times):
            while pending and pending[0][2] <= bag_time:
                topic, mtype, t, msg = pending.pop(0)
                writer.write(others[topic], t, store.serialize_cdr(msg, mtype))
            if isinstance(frame, bytes):  # a corrupt compressed image
                _, msg = image_message(store, np.zeros((8, 8, 3), np.uint8), stamp, "jpeg")
                msg.data = np.frombuffer(frame, np.uint8)
            else:
                _, msg = image_message(store, frame, stamp, image_format)
            writer.write(conn, bag_time, store.serialize_cdr(msg, msgtype))
    return stamps


@pytest.fixture(scope="module")
def scene():
    frames, labels = make_sequence("bagtest", seed=3, size=SIZE, frames=FRAMES, n_objects=3, scenario="translate_scale")
    return frames, labels


def check_outputs(in_bag, out_bag, expect_ids=None):
    """Every input image has exactly one masks and one objects message with its stamps; ids agree."""
    images = bag_images(in_bag)
    out = read_outputs(out_bag)
    masks, objects = out["/hqsmem_node/masks"], out["/hqsmem_node/objects"]
    assert [(t, stamp_ns(m)) for t, m in masks] == images
    assert [(t, stamp_ns(m)) for t, m in objects] == images
    for k, ((_, m), (_, o)) in enumerate(zip(masks, objects)):
        assert m.encoding == "mono16" and m.header.frame_id == "camera" and o.header.frame_id == "camera"
        label = image_codec.mask_from_msg(m)
        assert label.shape == (o.height, o.width)
        visible = {obj.id for obj in o.objects if obj.visible}
        assert set(np.unique(label).tolist()) - {0} == visible, f"frame {k}"
        for obj in o.objects:
            if obj.visible:
                assert obj.area == int((label == obj.id).sum())
        assert o.frame_index == k
        if expect_ids is not None:
            assert sorted(obj.id for obj in o.objects) == expect_ids
    return masks, objects


@pytest.mark.parametrize("storage,image_format", [("mcap", "rgb8"), ("sqlite3", "jpeg"),
                                                  ("mcap", "png"), ("sqlite3", "bgr8")])
def test_every_image_gets_one_mask_and_one_objects_message(tmp_path, capsys, storage, image_format):
    info = write_synthetic_bag(tmp_path / "in", FRAMES, SIZE, storage, image_format, n_objects=3, seed=1,
                               scenario="translate_scale")
    code, out, err = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "out", "--image-topic", TOPIC,
                            "--prompts", info["prompts_file"], "--overlay", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["frames_in"] == FRAMES and summary["results"] == FRAMES and summary["dropped_total"] == 0
    assert summary["storage"] == storage
    assert "frames/s" in err and "ETA" in err  # the progress line
    masks, objects = check_outputs(tmp_path / "in", tmp_path / "out", expect_ids=[1, 2, 3])
    assert verify_outputs(tmp_path / "out", TOPIC) == {"images": FRAMES, "masks": FRAMES, "objects": FRAMES,
                                                      "problems": []}
    assert [o.label for o in objects[0][1].objects] == ["object1", "object2", "object3"]
    # Input topics are copied unchanged, the output has the input's storage format.
    raw_in = all_raw(tmp_path / "in")
    raw_out = all_raw(tmp_path / "out")
    assert [r for r in raw_out if not r[0].startswith("/hqsmem_node/")] == raw_in
    suffix = ".mcap" if storage == "mcap" else ".db3"
    assert (tmp_path / "out" / f"out{suffix}").is_file()
    if storage == "sqlite3":  # written with large pages (faster blob writes), read by any sqlite
        import sqlite3
        with sqlite3.connect(tmp_path / "out" / "out.db3") as db:
            assert db.execute("PRAGMA page_size").fetchone()[0] == 65536
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == len(raw_out)
    overlay = read_outputs(tmp_path / "out")["/hqsmem_node/overlay"]
    assert [stamp_ns(m) for _, m in overlay] == [s for _, s in bag_images(tmp_path / "in")]
    assert overlay[0][1].encoding == "rgb8"
    # The first frame's masks are the prompts (mask prompts are taken as given).
    first = image_codec.mask_from_msg(masks[0][1])
    assert np.array_equal(first, info["labels0"].astype(np.uint16))


def test_masks_are_the_pipelines_and_output_is_deterministic(tmp_path, capsys, scene):
    frames, labels = scene
    write_frames_bag(tmp_path / "in", frames)
    write_label(tmp_path / "start.png", labels[0])
    (tmp_path / "p.yaml").write_text("prompts:\n" + "".join(
        f"  - {{id: {i}, frame: 0, mask: start.png}}\n" for i in (1, 2, 3)))
    # Twice the same way, once with the --bench pass first, with and without I/O threads: same bytes.
    for name, extra in (("a", []), ("b", []), ("c", ["--bench"]), ("d", ["--io-threads", "on"]),
                        ("e", ["--io-threads", "off"])):
        code, out, err = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / name, "--image-topic", TOPIC,
                                "--prompts", tmp_path / "p.yaml", "--quiet", "--json", *extra)
        assert code == 0, err
        timing = json.loads(out)["timing_ms_per_frame"]
        assert timing["pipeline"] > 0 and timing["wall"] >= timing["pipeline"]
        assert ("pipeline_alone" in timing) == (name == "c")
    raw = all_raw(tmp_path / "a")
    assert len(raw) == 3 * FRAMES
    for name in "bcde":
        assert all_raw(tmp_path / name) == raw, name
    # The same pipeline run directly on the frames gives the same label images.
    pipeline = HQSMemPipeline(None)
    masks = read_outputs(tmp_path / "a")["/hqsmem_node/masks"]
    for k, frame in enumerate(frames):
        prompts = [ObjectPrompt(i, mask=labels[0] == i) for i in (1, 2, 3)] if k == 0 else None
        result = pipeline.process(frame, stamp=(DEFAULT_START_NS + k * PERIOD) * 1e-9, prompts=prompts)
        assert np.array_equal(image_codec.mask_from_msg(masks[k][1]), result.label_map()), f"frame {k}"


def test_a_given_pipeline_is_reset_and_gives_a_fresh_runs_bytes_and_progress_is_reported(tmp_path, capsys, scene):
    """process_bag(pipeline=...): one pipeline through two bags (and a --bench pass) gives the
    bytes of fresh single-bag runs; one built from another config is refused; progress(done,
    total) is called once per image of the real run."""
    from hqsmem_ros.bag import process_bag
    from hqsmem_ros.core.config import ConfigError, load_config

    frames, labels = scene
    write_frames_bag(tmp_path / "in1", frames)
    write_frames_bag(tmp_path / "in2", frames[::-1][:12], storage="sqlite3")
    write_label(tmp_path / "start.png", labels[0])
    (tmp_path / "p.yaml").write_text("prompts:\n" + "".join(
        f"  - {{id: {i}, frame: 0, mask: start.png}}\n" for i in (1, 2, 3)))
    cfg = load_config({"memory_interval": 2})
    for name in ("in1", "in2"):
        process_bag(tmp_path / name, tmp_path / f"fresh_{name}", TOPIC, prompts_file=tmp_path / "p.yaml",
                    config=cfg, progress=False, log=lambda text: None)
    pipeline = HQSMemPipeline(cfg)
    calls = []
    for name, bench in (("in1", False), ("in2", True), ("in1", True)):
        calls.clear()
        out = tmp_path / f"shared_{name}_{bench}"
        summary = process_bag(tmp_path / name, out, TOPIC, prompts_file=tmp_path / "p.yaml", config=cfg,
                              pipeline=pipeline, progress=lambda done, total: calls.append((done, total)),
                              bench=bench, log=lambda text: None)
        assert all_raw(out) == all_raw(tmp_path / f"fresh_{name}"), (name, bench)
        n = summary.frames_in
        assert calls == [(k, n) for k in range(1, n + 1)]
    assert "frames/s" not in capsys.readouterr().err  # a callback instead of the progress line
    with pytest.raises(ConfigError, match="another config"):
        process_bag(tmp_path / "in1", tmp_path / "other", TOPIC, prompts_file=tmp_path / "p.yaml",
                    config={"memory_interval": 3}, pipeline=pipeline, progress=False)
    assert not (tmp_path / "other").exists()


def test_prompts_file_box_mask_label_and_removal(tmp_path, capsys, scene):
    frames, labels = scene
    write_frames_bag(tmp_path / "in", frames, storage="sqlite3", image_format="png")
    ys, xs = np.nonzero(labels[0] == 1)
    box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    (tmp_path / "masks").mkdir()
    write_label(tmp_path / "masks" / "f3.png", (labels[3] == 2).astype(np.uint8) * 7)
    stamp5 = DEFAULT_START_NS + 5 * PERIOD
    (tmp_path / "p.yaml").write_text(f"""
prompts:
  - id: 1
    frame: 0
    box: {box}
    label: box object
  - id: 2
    frame: 3
    mask: masks/f3.png
    mask_value: 7
remove:
  - id: 1
    stamp: {{sec: {stamp5 // 10**9}, nanosec: {stamp5 % 10**9}}}
""")
    code, out, err = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "out", "--image-topic", TOPIC,
                            "--prompts", tmp_path / "p.yaml", "--quiet")
    assert code == 0, err
    assert "prompts applied 3" in out
    objects = read_outputs(tmp_path / "out")["/hqsmem_node/objects"]
    ids = [sorted(o.id for o in m.objects) for _, m in objects]
    assert ids == [[1]] * 3 + [[1, 2]] * 2 + [[2]] * (FRAMES - 5)
    assert objects[0][1].objects[0].label == "box object"
    first = objects[0][1].objects[0]
    # The box prompt was refined into a mask of the object inside it.
    assert first.visible and box[0] <= first.x_min and first.x_max <= box[2] and first.area > 50
    masks = read_outputs(tmp_path / "out")["/hqsmem_node/masks"]
    assert np.array_equal(image_codec.mask_from_msg(masks[3][1]) == 2, labels[3] == 2)


def test_prompt_topic_applies_at_its_stamp(tmp_path, capsys, scene):
    frames, labels = scene
    store = make_typestore()
    stamps = [DEFAULT_START_NS + k * PERIOD for k in range(FRAMES)]
    # Stamped like frame 4 but recorded (bag time) before frame 0: the stamp decides.
    early = prompt_array_message(store, labels[4].astype(np.uint16), stamps[4])
    empty = prompt_array_message(store, np.zeros_like(labels[0], np.uint16), stamps[2])  # ignored, as by the node
    assert len(empty.prompts) == 0
    bad = prompt_array_message(store, labels[9].astype(np.uint16), stamps[9] - 1000)
    bad.prompts = bad.prompts[:1]
    bad.prompts[0].id = 0  # a mono16 label mask needs an id: refused as the node refuses it
    extra = [("/hqsmem_node/prompts", "hqsmem_ros/msg/ObjectPromptArray", stamps[0] - 10, early),
             ("/hqsmem_node/prompts", "hqsmem_ros/msg/ObjectPromptArray", stamps[1], empty),
             ("/hqsmem_node/prompts", "hqsmem_ros/msg/ObjectPromptArray", stamps[9], bad)]
    write_frames_bag(tmp_path / "in", frames, extra=extra)
    code, out, err = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "out", "--image-topic", TOPIC,
                            "--prompt-topic", "/hqsmem_node/prompts", "--quiet", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["prompts_applied"] == 1 and summary["prompts_refused"] == 1
    assert "mono16 label mask needs the prompt's id" in summary["refused_reasons"][0]
    objects = read_outputs(tmp_path / "out")["/hqsmem_node/objects"]
    ids = [sorted(o.id for o in m.objects) for _, m in objects]
    assert ids == [[]] * 4 + [[1, 2, 3]] * (FRAMES - 4)
    assert [o.label for o in objects[4][1].objects] == ["object1", "object2", "object3"]
    check_outputs(tmp_path / "in", tmp_path / "out")


def test_click_prompts_on_the_prompt_topic_start_objects(tmp_path, capsys, scene):
    from hqsmem_ros.tools.synth_bag import _header as make_header
    frames, labels = scene
    store = make_typestore()
    T = store.types
    stamps = [DEFAULT_START_NS + k * PERIOD for k in range(FRAMES)]
    gt = labels[3] == 1
    dist = cv2.distanceTransform(gt.astype(np.uint8), cv2.DIST_L2, 5)
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    empty_mask = T["sensor_msgs/msg/Image"](header=make_header(store, stamps[3], "camera"), height=0, width=0, encoding="",
                                            is_bigendian=0, step=0, data=np.zeros(0, np.uint8))
    click = T["hqsmem_ros/msg/ObjectPrompt"](
        id=0, label="clicked", has_box=False, x_min=0.0, y_min=0.0, x_max=0.0, y_max=0.0, mask=empty_mask,
        positive_points=[T["geometry_msgs/msg/Point32"](x=float(x), y=float(y), z=0.0)], negative_points=[])
    msg = T["hqsmem_ros/msg/ObjectPromptArray"](header=make_header(store, stamps[3], "camera"), prompts=[click])
    write_frames_bag(tmp_path / "in", frames,
                     extra=[("/hqsmem_node/prompts", "hqsmem_ros/msg/ObjectPromptArray", stamps[3], msg)])
    code, out, err = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "out", "--image-topic", TOPIC,
                            "--prompt-topic", "/hqsmem_node/prompts", "--quiet", "--json")
    assert code == 0, err
    assert json.loads(out)["prompts_applied"] == 1
    outputs = read_outputs(tmp_path / "out")
    objects = outputs["/hqsmem_node/objects"]
    assert [[(o.id, o.label) for o in m.objects] for _, m in objects] == [[]] * 3 + [[(1, "clicked")]] * (FRAMES - 3)
    label3 = image_codec.mask_from_msg(outputs["/hqsmem_node/masks"][3][1])
    m = label3 == 1
    assert (m & gt).sum() / (m | gt).sum() > 0.8


def test_undecodable_images_are_counted_and_have_no_mask(tmp_path, capsys, scene):
    frames, labels = scene
    frames = list(frames)
    frames[6] = b"\xff\xd8 not really a jpeg"
    frames[11] = b""
    write_frames_bag(tmp_path / "in", frames, image_format="jpeg")
    write_label(tmp_path / "start.png", labels[0])
    (tmp_path / "p.yaml").write_text("prompts:\n  - {id: 1, frame: 0, mask: start.png}\n")
    code, out, err = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "out", "--image-topic", TOPIC,
                            "--prompts", tmp_path / "p.yaml", "--quiet", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert (s["frames_in"], s["results"], s["dropped_total"]) == (FRAMES, FRAMES - 2, 2)
    assert s["dropped"] == {"bad_image": 2}
    assert "frame 6" in s["dropped_examples"][0] and "undecodable" in s["dropped_examples"][0]
    assert "dropped 2" in err or "dropped frame 6" in err
    images = bag_images(tmp_path / "in")
    masks = read_outputs(tmp_path / "out")["/hqsmem_node/masks"]
    kept = [im for k, im in enumerate(images) if k not in (6, 11)]
    assert [(t, stamp_ns(m)) for t, m in masks] == kept
    problems = verify_outputs(tmp_path / "out", TOPIC)["problems"]
    assert len(problems) == 2 and "0 masks and 0 objects messages" in problems[0]
    # The human-readable summary says the same.
    code, out, _ = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "out2", "--image-topic", TOPIC,
                          "--prompts", tmp_path / "p.yaml", "--quiet")
    assert f"frames in {FRAMES}, results {FRAMES - 2}, dropped 2 (bad_image 2" in out


def test_changing_image_size_resets_the_tracker_and_loses_no_frame(tmp_path, capsys, scene):
    frames, labels = scene
    small = [cv2.resize(f, (128, 96), interpolation=cv2.INTER_AREA) for f in frames[10:]]
    write_frames_bag(tmp_path / "in", list(frames[:10]) + small)
    write_label(tmp_path / "start.png", labels[0])
    small_label = cv2.resize(labels[12], (128, 96), interpolation=cv2.INTER_NEAREST)
    write_label(tmp_path / "small.png", (small_label == 1).astype(np.uint8))
    (tmp_path / "p.yaml").write_text("prompts:\n  - {id: 1, frame: 0, mask: start.png}\n"
                                     "  - {id: 5, frame: 12, mask: small.png}\n")
    code, out, err = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "out", "--image-topic", TOPIC,
                            "--prompts", tmp_path / "p.yaml", "--quiet", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert (s["frames_in"], s["results"], s["resets"]) == (FRAMES, FRAMES, 1)
    assert "size changed from 160x120 to 128x96 at frame 10" in s["reset_reasons"][0]
    assert "tracker reset" in err
    masks, objects = check_outputs(tmp_path / "in", tmp_path / "out")
    ids = [sorted(o.id for o in m.objects) for _, m in objects]
    assert ids == [[1]] * 10 + [[]] * 2 + [[5]] * (FRAMES - 12)
    assert (masks[10][1].width, masks[10][1].height) == (128, 96)
    # Object 1 was retired by the reset: a prompt that reuses its id is an error naming the entry.
    (tmp_path / "reuse.yaml").write_text("prompts:\n  - {id: 1, frame: 0, mask: start.png}\n"
                                         "  - {id: 1, frame: 12, mask: small.png}\n")
    code, _, err = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "out2", "--image-topic", TOPIC,
                          "--prompts", tmp_path / "reuse.yaml", "--quiet")
    assert code == 2 and "reuse.yaml: prompts[1] (id 1)" in err and "never reused" in err
    assert not (tmp_path / "out2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_stamps_going_back_reset_the_tracker_like_the_node(tmp_path, capsys, scene):
    frames, labels = scene
    stamps = [DEFAULT_START_NS + (k % 12) * PERIOD for k in range(FRAMES)]  # a bag looping at frame 12
    write_frames_bag(tmp_path / "in", frames, stamps=stamps)
    write_label(tmp_path / "start.png", labels[0])
    (tmp_path / "p.yaml").write_text("prompts:\n  - {id: 1, frame: 0, mask: start.png}\n")
    code, out, err = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "out", "--image-topic", TOPIC,
                            "--prompts", tmp_path / "p.yaml", "--quiet", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert (s["frames_in"], s["results"], s["resets"]) == (FRAMES, FRAMES, 1)
    assert "stamps went back" in s["reset_reasons"][0] and "at frame 12" in s["reset_reasons"][0]
    masks, objects = check_outputs(tmp_path / "in", tmp_path / "out")
    assert [len(m.objects) for _, m in objects] == [1] * 12 + [0] * (FRAMES - 12)


def test_missing_topic_lists_the_topics(tmp_path, capsys):
    write_synthetic_bag(tmp_path / "in", 3, SIZE, prompts=None)
    code, _, err = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "out", "--image-topic", "/cam/rgb")
    assert code == 2
    assert "no topic '/cam/rgb'" in err and str(tmp_path / "in") in err
    assert "/camera/image_raw (sensor_msgs/msg/Image, 3 messages)" in err
    assert "/camera/camera_info (sensor_msgs/msg/CameraInfo, 3 messages)" in err
    assert not (tmp_path / "out").exists()
    code, _, err = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "out", "--image-topic", "/camera/camera_info")
    assert code == 2 and "expected sensor_msgs/msg/Image or sensor_msgs/msg/CompressedImage" in err


@pytest.mark.parametrize("storage,suffix", [("mcap", ".mcap"), ("sqlite3", ".db3")])
def test_truncated_bag_is_an_error_naming_it(tmp_path, capsys, storage, suffix):
    write_synthetic_bag(tmp_path / "in", 10, SIZE, storage, prompts=None)
    data = tmp_path / "in" / f"in{suffix}"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    code, out, err = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "out", "--image-topic", TOPIC)
    assert code == 2 and out == ""
    assert f"cannot read bag {tmp_path / 'in'}" in err and "truncated or corrupt" in err
    assert not (tmp_path / "out").exists()
    # The storage file given directly is named too.
    code, _, err = hqsmem(capsys, "bag", data, tmp_path / "out", "--image-topic", TOPIC)
    assert code == 2 and str(data) in err


def test_bad_requests_are_clear_errors(tmp_path, capsys, scene):
    frames, labels = scene
    write_frames_bag(tmp_path / "in", frames[:5])
    write_label(tmp_path / "big.png", np.pad(labels[0], 4))
    cases = {
        "size.yaml": ("prompts:\n  - {id: 2, frame: 1, mask: big.png}\n",
                      "size.yaml: prompts[0] (id 2): mask is 168x128 but the image at frame 1 is 160x120"),
        "remove.yaml": ("remove:\n  - {id: 3, frame: 2}\n",
                        "remove.yaml: remove[0] (id 3): cannot apply on frame 2"),
        "outside.yaml": ("prompts:\n  - {id: 1, frame: 0, box: [500, 10, 600, 50]}\n",
                         "outside.yaml: prompts[0] (id 1): box [500, 10, 600, 50] is outside the 160x120 image"),
    }
    for name, (text, needle) in cases.items():
        (tmp_path / name).write_text(text)
        code, _, err = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "out", "--image-topic", TOPIC,
                              "--prompts", tmp_path / name, "--quiet")
        assert code == 2 and needle in err, (name, err)
        assert not (tmp_path / "out").exists()
    code, _, err = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "in", "--image-topic", TOPIC)
    assert code == 2 and "exists already" in err
    (tmp_path / "untrained.yaml").write_text("refiner: {type: sam_hq, random_weights: true}\n")
    code, _, err = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "out", "--image-topic", TOPIC,
                          "--config", tmp_path / "untrained.yaml")
    assert code == 2 and "refiner (sam_hq): random_weights is true" in err and "--allow-random-weights" in err
    assert not (tmp_path / "out").exists()
    # A bag that already holds the node's output topics (a recording of the live node).
    shutil.copytree(tmp_path / "in", tmp_path / "in_copy")
    (tmp_path / "ok.yaml").write_text("prompts:\n  - {id: 1, frame: 0, box: [10, 10, 60, 60]}\n")
    code, _, err = hqsmem(capsys, "bag", tmp_path / "in_copy", tmp_path / "o1", "--image-topic", TOPIC, "--quiet",
                          "--prompts", tmp_path / "ok.yaml")
    assert code == 0, err
    code, _, err = hqsmem(capsys, "bag", tmp_path / "o1", tmp_path / "o2", "--image-topic", TOPIC, "--quiet")
    assert code == 2 and "already has topic(s) /hqsmem_node/masks" in err
    code, _, err = hqsmem(capsys, "bag", tmp_path / "o1", tmp_path / "o2", "--image-topic", TOPIC, "--quiet",
                          "--ns", "/second")
    assert code == 0, err
    assert set(read_outputs(tmp_path / "o2", ns="/second")) == {"/second/masks", "/second/objects"}


def test_prompt_events_after_the_last_image_are_reported(tmp_path, capsys, scene):
    frames, labels = scene
    write_frames_bag(tmp_path / "in", frames[:4])
    (tmp_path / "p.yaml").write_text("prompts:\n  - {id: 1, frame: 0, box: [10, 10, 60, 60]}\n"
                                     "  - {id: 2, frame: 40, box: [10, 10, 60, 60]}\n")
    code, out, _ = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "out", "--image-topic", TOPIC,
                          "--prompts", tmp_path / "p.yaml", "--quiet")
    assert code == 0
    assert "never applied 1" in out and "prompts[1] (id 2) at frame 40" in out


def test_decompression_bomb_and_the_pixel_limit(tmp_path, capsys, scene):
    from hqsmem_ros.tools.bench_bomb import jpeg_claiming

    frames, _ = scene
    frames = list(frames[:6])
    frames[4] = jpeg_claiming(60000, 60000, pad_to=12_000)
    write_frames_bag(tmp_path / "in", frames, image_format="jpeg")
    code, out, err = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "out", "--image-topic", TOPIC,
                            "--quiet", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert (s["results"], s["dropped"]) == (5, {"bad_image": 1})
    assert "frame 4" in s["dropped_examples"][0] and "60000x60000" in s["dropped_examples"][0]
    # a limit under the frames' own 160x120 = 19200 pixels refuses every frame, each counted
    code, out, err = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "out2", "--image-topic", TOPIC,
                            "--quiet", "--json", "--max-image-pixels", 19199)
    assert code == 0, err
    s = json.loads(out)
    assert (s["results"], s["dropped"]) == (0, {"bad_image": 6})
    assert "exceeds the limit of 19199 pixels" in s["dropped_examples"][0]
    code, _, err = hqsmem(capsys, "bag", tmp_path / "in", tmp_path / "out3", "--image-topic", TOPIC,
                          "--max-image-pixels", 0)
    assert code == 2 and "--max-image-pixels must be at least 1" in err


def test_a_killed_bag_run_leaves_a_hidden_folder_that_the_next_run_removes(tmp_path, scene):
    import os
    import subprocess
    import sys
    import time

    frames, _ = scene
    write_frames_bag(tmp_path / "in", list(frames) * 10)  # 200 frames: seconds of work
    args = [sys.executable, "-m", "hqsmem_ros.cli", "bag", str(tmp_path / "in"), str(tmp_path / "out"),
            "--image-topic", TOPIC, "--quiet"]
    alive = tmp_path / f".out.partial-{os.getpid()}-keep"  # a run still going: left alone
    alive.mkdir()
    stale = lambda: [p for p in tmp_path.glob(".out.partial-*") if p != alive]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.is_dir() and any(p.rglob("*")) for p in stale()):  # the bag is being written
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.wait(timeout=30)
    assert len(stale()) == 1 and not (tmp_path / "out").exists()
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert stale() == [] and alive.is_dir() and (tmp_path / "out").is_dir()


# ---------------------------------------------------------------------------------------------
# --depth-topic: the node's 3D fields offline


def _depth_bag(path, data, storage="sqlite3", skip=(5,)):
    """The synthetic RGB-D frames: colour on TOPIC, 16UC1 depth and its camera_info beside it
    (depth frames in `skip` left out), written just before each colour frame."""
    from hqsmem_ros.data.synth_rgbd import intrinsics
    from hqsmem_ros.tools.synth_bag import _header

    store = make_typestore()
    h, w = data[0].label.shape
    intr = intrinsics(w, h)
    T = store.types
    extra = []
    for k, f in enumerate(data):
        t = DEFAULT_START_NS + k * PERIOD
        info = T["sensor_msgs/msg/CameraInfo"](
            header=_header(store, t, "depth_optical"), height=h, width=w, distortion_model="plumb_bob",
            d=np.zeros(5), k=np.array([intr.fx, 0, intr.cx, 0, intr.fy, intr.cy, 0, 0, 1], float),
            r=np.eye(3).ravel(), p=np.zeros(12), binning_x=0, binning_y=0,
            roi=T["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))
        extra.append(("/camera/depth/camera_info", "sensor_msgs/msg/CameraInfo", t, info))
        if k in skip:
            continue
        mm = np.ascontiguousarray(f.depth_mm.astype("<u2"))
        depth = T["sensor_msgs/msg/Image"](header=_header(store, t, "depth_optical"), height=h, width=w,
                                           encoding="16UC1", is_bigendian=0, step=w * 2,
                                           data=np.frombuffer(mm.tobytes(), np.uint8))
        extra.append(("/camera/depth/image_raw", "sensor_msgs/msg/Image", t, depth))
    write_frames_bag(path, [f.rgb for f in data], storage=storage, extra=extra)


def test_bag_depth_topic_writes_the_nodes_3d_fields_and_counts_frames_without_depth(tmp_path, capsys):
    from hqsmem_ros.core.depth3d import Depth3D, DepthParams, depth_from_array
    from hqsmem_ros.data.synth_rgbd import intrinsics, make_rgbd
    from hqsmem_ros.tools.synth_bag import write_prompts_file

    data = make_rgbd(0, (320, 240), 10, 3)
    _depth_bag(tmp_path / "in", data)
    prompts = write_prompts_file(tmp_path / "p.prompts.yaml", data[0].label)
    code, out, err = hqsmem(capsys, "bag", str(tmp_path / "in"), str(tmp_path / "out"), "--image-topic", TOPIC,
                            "--prompts", str(prompts), "--depth-topic", "/camera/depth/image_raw", "--json", "--quiet")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["results"] == 10 and summary["depth"]["frames_3d"] == 9
    assert summary["depth"]["no_3d.outside_tolerance"] == 1 and summary["depth"]["pairing.depth_received"] == 9
    objects = [m for _, m in read_outputs(tmp_path / "out")["/hqsmem_node/objects"]]
    assert len(objects) == 10 and not verify_outputs(tmp_path / "out", TOPIC)["problems"]

    # the same as the node's steps: the pipeline's result, then Depth3D with the depth frame
    pipeline, d3 = HQSMemPipeline(), Depth3D(DepthParams())
    intr = intrinsics(320, 240)
    d3.set_camera_info([intr.fx, 0, intr.cx, 0, intr.fy, intr.cy, 0, 0, 1], 320, 240)
    errors = []
    for k, (f, arr) in enumerate(zip(data, objects)):
        t = (DEFAULT_START_NS + k * PERIOD) * 1e-9
        prompts0 = [ObjectPrompt(int(i), mask=f.label == i) for i in np.unique(f.label) if i] if k == 0 else None
        result = pipeline.process(f.rgb, stamp=t, prompts=prompts0)
        if k != 5:
            d3.add_depth_image(depth_from_array(f.depth_mm, "16UC1", t, "depth_optical"))
        f3 = d3.process(result)
        assert arr.status_3d == f3.reason == ("outside_tolerance" if k == 5 else "")
        assert arr.frame_id_3d == ("" if k == 5 else "depth_optical")
        for o, m in zip(f3.objects or [None] * len(arr.objects), arr.objects):
            if k == 5:
                assert not m.has_position_3d and m.position_3d_status == "outside_tolerance"
                continue
            assert m.has_position_3d and m.id == o.id and m.valid_depth_points == o.valid_points
            np.testing.assert_allclose((m.position.x, m.position.y, m.position.z), o.position, rtol=0, atol=1e-9)
            np.testing.assert_allclose((m.size.x, m.size.y, m.size.z), o.size, rtol=0, atol=1e-9)
            errors.append(np.linalg.norm(np.subtract(o.position, f.truth[o.id].centre)))
    assert len(errors) == 27 and np.median(errors) < 0.03


def test_bag_without_depth_topic_writes_empty_3d_fields_and_a_missing_depth_topic_is_exit_2(tmp_path, capsys):
    frames, labels = make_sequence("nodepth", seed=3, size=(96, 64), frames=3, n_objects=1, scenario="translate_scale")
    write_frames_bag(tmp_path / "in", frames)
    prompts = tmp_path / "p.prompts.yaml"
    from hqsmem_ros.tools.synth_bag import write_prompts_file
    write_prompts_file(prompts, labels[0])
    code, _, err = hqsmem(capsys, "bag", str(tmp_path / "in"), str(tmp_path / "out"), "--image-topic", TOPIC,
                          "--prompts", str(prompts), "--quiet")
    assert code == 0, err
    arr = read_outputs(tmp_path / "out")["/hqsmem_node/objects"][0][1]
    assert arr.frame_id_3d == "" and arr.status_3d == "" and arr.depth_stamp.sec == 0
    o = arr.objects[0]
    assert not o.has_position_3d and o.position.z == 0.0 and o.position_3d_status == "" and o.valid_depth_points == 0
    code, _, err = hqsmem(capsys, "bag", str(tmp_path / "in"), str(tmp_path / "out2"), "--image-topic", TOPIC,
                          "--depth-topic", "/camera/depth/image_raw")
    assert code == 2 and "no topic '/camera/depth/image_raw'" in err and not (tmp_path / "out2").exists()
