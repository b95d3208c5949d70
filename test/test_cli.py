"""The `hqsmem` command line as a user runs it: synth -> track -> eval, and its errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hqsmem_ros.data.synth import write_sequence
from hqsmem_ros.eval.davis_io import read_label, write_label

HQSMEM = [sys.executable, "-m", "hqsmem_ros.cli"]


def run(*args, cwd=None):
    return subprocess.run([*HQSMEM, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def seq(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_sequence(root, "translate_scale", seed=4, size=(256, 192), frames=60, n_objects=3)
    return root / "JPEGImages" / "translate_scale", root / "Annotations" / "translate_scale"


def test_track_then_eval(seq, tmp_path):
    frames, annotations = seq
    out = tmp_path / "pred"
    r = run("track", frames, "--init-mask", annotations / "00000.png", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.stem + ".png" for p in frames.iterdir())
    first = read_label(out / "00000.png")
    assert set(np.unique(first)) == set(np.unique(read_label(annotations / "00000.png")))
    r = run("eval", out, annotations, "--json")
    assert r.returncode == 0, r.stderr
    scores = json.loads(r.stdout)
    assert set(scores) == {"J", "F", "JF", "Q", "Acc", "Rob", "NRE", "DRE", "ADQ"}
    assert scores["JF"] > 0.6  # copying the first mask scores about 0.01 on this sequence
    r = run("eval", out, annotations)
    assert r.returncode == 0 and "J" in r.stdout


def _assert_clean_failure(r, out: Path, needle: str):
    assert r.returncode != 0
    assert needle in r.stderr, r.stderr
    if out.exists():
        visible = [p for p in out.iterdir() if not p.name.startswith(".")]
        assert visible == [], "a failed run must not leave output that looks complete"
        assert list(out.iterdir()) == []


def test_track_errors_name_the_file(seq, tmp_path):
    frames, annotations = seq
    mask = annotations / "00000.png"
    out = tmp_path / "o1"
    _assert_clean_failure(run("track", tmp_path / "nope", "--init-mask", mask, "--out", out), out, "nope")

    small = tmp_path / "small.png"
    write_label(small, np.ones((10, 10), np.uint8))
    _assert_clean_failure(run("track", frames, "--init-mask", small, "--out", out), out, "small.png")

    empty = tmp_path / "empty.png"
    write_label(empty, np.zeros((192, 256), np.uint8))
    _assert_clean_failure(run("track", frames, "--init-mask", empty, "--out", out), out, "empty")

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in sorted(frames.iterdir())[:3]:
        (mixed / p.name).write_bytes(p.read_bytes())
    (mixed / "notes.txt").write_text("not an image")
    _assert_clean_failure(run("track", mixed, "--init-mask", mask, "--out", out), out, "notes.txt")

    broken = tmp_path / "broken"
    broken.mkdir()
    for p in sorted(frames.iterdir())[:4]:
        (broken / p.name).write_bytes(p.read_bytes())
    (broken / "00002.jpg").write_bytes(b"\xff\xd8 truncated")
    _assert_clean_failure(run("track", broken, "--init-mask", mask, "--out", out), out, "00002.jpg")

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = run("track", frames, "--init-mask", mask, "--out", blocker / "sub")
    assert r.returncode != 0 and "cannot write" in r.stderr


def test_synth_and_bad_config(tmp_path):
    r = run("synth", tmp_path / "s", "--seed", "1", "--size", "128x96")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "s" / "Annotations").iterdir())) == 5
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tau_verify: 7\n")
    frames = tmp_path / "s" / "JPEGImages" / "split"
    r = run("track", frames, "--init-mask", tmp_path / "s" / "Annotations" / "split" / "00000.png",
            "--out", tmp_path / "o", "--config", cfg)
    assert r.returncode == 2 and "tau_verify" in r.stderr and "c.yaml" in r.stderr


def test_bench_json_reports_fps_and_bounded_memory():
    r = run("bench", "--size", "160x120", "--objects", "2", "--frames", "40", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["fps"] > 0 and rep["base_fps"] > 0
    assert rep["full"]["memory_bank_max"] <= rep["config"]["memory_capacity"]
    assert set(rep["full"]["stage_ms"]) >= {"track", "refine", "verify", "memory", "total"}


def test_bench_sam2_compares_the_predictor_and_the_tracker(tmp_path):
    out = tmp_path / "r.json"
    r = run("bench-sam2", "--image-size", "64", "--size", "96x64", "--frames", "4", "--every", "2",
            "--reference", "2", "--batch-frames", "6", "--json", out)
    assert r.returncode == 0, r.stderr
    assert "this tracker's step: 1 object" in r.stdout and "ratio" in r.stdout
    rep = json.loads(out.read_text())
    assert [p["frame"] for p in rep["predictor"]] == [p["frame"] for p in rep["ours"]] == [2, 4]
    assert rep["predictor"][1]["state_mb"] > rep["predictor"][0]["state_mb"]  # keeps every frame
    assert rep["passes_5_objects"] == [[1, 2, 3, 4, 5]] and rep["passes_5_staggered"] == [[1, 2, 3, 4, 5]]
    assert run("bench-sam2", "--frames", "x").returncode == 2


def test_track_with_129_objects(tmp_path):
    # A first mask of 129 ids used to end in a traceback (cv2.remap, more than 128 channels).
    import cv2
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    rng = np.random.default_rng(1)
    background = rng.integers(0, 60, (120, 160, 3), dtype=np.uint8)
    for t in range(3):
        img, lab = background.copy(), np.zeros((120, 160), np.uint8)
        for k in range(129):
            y, x = 8 * (k // 20) + 1, 8 * (k % 20) + 1 + 2 * (t % 2)
            img[y:y + 6, x:x + 6] = (90 + (37 * k) % 160, 90 + (91 * k) % 160, 250 - (53 * k) % 100)
            lab[y:y + 6, x:x + 6] = k + 1
        cv2.imwrite(str(frames_dir / f"{t:05d}.png"), img[..., ::-1])
        if t == 0:
            write_label(tmp_path / "init.png", lab)
    r = run("track", frames_dir, "--init-mask", tmp_path / "init.png", "--out", tmp_path / "pred", "--quiet")
    assert r.returncode == 0, r.stderr
    last = read_label(tmp_path / "pred" / "00002.png")
    assert len(set(np.unique(last)) - {0}) == 129


@pytest.mark.parametrize("section, key", [("tracker: {type: flow, color_bins: [3, 32]}", "color_bins"),
                                          ("tracker: {type: flow, anchor_weight: 2}", "anchor_weight"),
                                          ("refiner: {type: watershed, bands: [1, 2]}", "bands")])
def test_bad_model_parameter_is_a_one_line_error(seq, tmp_path, section, key):
    frames, annotations = seq
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(section + "\n")
    r = run("track", frames, "--init-mask", annotations / "00000.png", "--out", tmp_path / "o", "--config", cfg)
    assert r.returncode == 2 and key in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_track_with_the_quality_profile(seq, tmp_path):
    frames, annotations = seq
    profile = Path(__file__).parent.parent / "config" / "quality.yaml"
    out = tmp_path / "pred"
    r = run("track", frames, "--init-mask", annotations / "00000.png", "--out", out, "--quiet", "--config", profile)
    assert r.returncode == 0, r.stderr
    r = run("eval", out, annotations, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["JF"] > 0.6  # copying the first mask scores about 0.01 here
