"""The `hqsmem` command line as a user runs it: synth -> track -> eval, and its errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hqsmem_ros.data.synth import SUITE, write_sequence
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
    assert set(scores) == {"J", "F", "JF", "Q", "Acc", "Rob", "NRE", "DRE", "ADQ", "id_switches",
                           "id_switches_per_sequence"}
    assert scores["JF"] > 0.6  # copying the first mask scores about 0.01 on this sequence
    assert scores["id_switches_per_sequence"] == {"translate_scale": scores["id_switches"]}
    r = run("eval", out, annotations)
    assert r.returncode == 0 and "J" in r.stdout and "IDsw" in r.stdout


def test_eval_counts_identity_switches_of_a_swapped_prediction(seq, tmp_path):
    _, annotations = seq
    out = tmp_path / "swapped"
    out.mkdir()
    for k, path in enumerate(sorted(annotations.iterdir())):
        label = read_label(path)
        if k >= 30:  # from frame 30 on, objects 1 and 2 carry each other's id
            label = np.choose(label, [0, 2, 1, 3]).astype(np.uint8)
        write_label(out / path.name, label)
    r = run("eval", out, annotations, "--json")
    assert r.returncode == 0, r.stderr
    scores = json.loads(r.stdout)
    assert scores["id_switches"] == 2 and scores["id_switches_per_sequence"] == {"translate_scale": 2}


def test_ablate_table_shows_identity_switches(seq, tmp_path):
    root = seq[0].parent.parent
    r = run("ablate", root, "--rows", "base", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)["rows"]["base"]
    assert row["id_switches"] == sum(s["id_switches"] for s in row["per_sequence"].values())
    r = run("ablate", root, "--rows", "base")
    assert r.returncode == 0, r.stderr
    head, _, line = r.stdout.splitlines()[:3]
    assert head.split()[-2:] == ["IDsw", "fps"] and line.split()[-2] == str(row["id_switches"])


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


def test_track_over_a_folder_with_a_frame_of_another_size(seq, tmp_path):
    # The stream session's size check (the node resets there); a folder is one sequence, so the
    # frame is an error naming it, and nothing is written.
    import cv2
    frames, annotations = seq
    folder = tmp_path / "sizes"
    folder.mkdir()
    for p in sorted(frames.iterdir())[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    odd = sorted(folder.iterdir())[2]
    cv2.imwrite(str(odd), cv2.resize(cv2.imread(str(odd)), (128, 96)))
    out = tmp_path / "o"
    r = run("track", folder, "--init-mask", annotations / "00000.png", "--out", out, "--quiet")
    _assert_clean_failure(r, out, f"{odd}: image size changed from 256x192 to 128x96 at frame 2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_track_refuses_a_first_mask_the_tracker_cannot_hold(seq, tmp_path):
    # The session logs a refused initial mask and goes on (the node); `hqsmem track` stops.
    pytest.importorskip("torch", reason="DeAOT needs PyTorch")
    frames, annotations = seq
    cfg = tmp_path / "one.yaml"
    cfg.write_text("device: cpu\ntracker: {type: deaot, random_weights: true, max_objects: 1}\n")
    out = tmp_path / "o"
    r = run("track", frames, "--init-mask", annotations / "00000.png", "--out", out, "--config", cfg, "--quiet")
    _assert_clean_failure(r, out, "can track at most 1 objects")
    assert r.returncode == 2 and "00000.png" in r.stderr and "Traceback" not in r.stderr


def test_synth_and_bad_config(tmp_path):
    r = run("synth", tmp_path / "s", "--seed", "1", "--size", "128x96")
    assert r.returncode == 0, r.stderr
    written = sorted(p.name for p in (tmp_path / "s" / "Annotations").iterdir())
    assert written == sorted(name for name, _, _ in SUITE) and "identity" in written and len(written) == 6
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
    fp16 = run("bench-sam2", "--precision", "fp16")  # the official predictor cannot run fp16: said before loading
    assert fp16.returncode == 2 and "--skip-predictor" in fp16.stderr and "bfloat16" in fp16.stderr


def _kill_when(proc, ready, timeout=120.0):
    """SIGKILL `proc` as soon as ready() is true (a real killed run, not a simulated one)."""
    import time
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.wait(timeout=30)


def test_a_killed_track_leaves_a_hidden_folder_that_the_next_run_removes(seq, tmp_path):
    import os
    frames, annotations = seq
    out = tmp_path / "pred"
    out.mkdir()
    alive = out / f".partial-{os.getpid()}-keep"  # a run still going (this process): left alone
    alive.mkdir()
    args = [*HQSMEM, "track", str(frames), "--init-mask", str(annotations / "00000.png"), "--out",
            str(out), "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stale = lambda: [p for p in out.glob(".partial-*") if p != alive]
    _kill_when(proc, lambda: any(p.is_dir() and any(p.iterdir()) for p in stale()))
    assert proc.returncode == -9 and len(stale()) == 1  # what a killed run leaves
    r = run(*args[3:])
    assert r.returncode == 0, r.stderr
    assert stale() == [] and alive.is_dir()
    assert len(list(out.glob("*.png"))) == len(list(frames.iterdir()))


def test_full_disk_during_track_is_a_one_line_error(seq, tmp_path, monkeypatch):
    """The real thing where this test may mount a tiny tmpfs (root); else the write fails with
    the same OSError(ENOSPC) as a full disk gives."""
    import errno
    import os
    frames, annotations = seq
    out = tmp_path / "tiny"
    out.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(out)], capture_output=True).returncode == 0
    try:
        if mounted:
            r = run("track", frames, "--init-mask", annotations / "00000.png", "--out", out, "--quiet")
            code, err = r.returncode, r.stderr
        else:
            import hqsmem_ros.eval.davis_io as davis_io
            from hqsmem_ros.cli import main

            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            monkeypatch.setattr(davis_io, "write_label", full)
            import io
            from contextlib import redirect_stderr
            buf = io.StringIO()
            with redirect_stderr(buf):
                code = main(["track", str(frames), "--init-mask", str(annotations / "00000.png"),
                             "--out", str(out), "--quiet"])
            err = buf.getvalue()
        assert code == 2, err
        assert "No space left on device" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
        assert list(out.glob("*.png")) == [] and list(out.glob(".partial-*")) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=True)


def test_config_problems_are_one_line_errors(seq, tmp_path):
    frames, annotations = seq
    (tmp_path / "latin1.yaml").write_bytes("ablation: full\n# caf\xe9\n".encode("latin-1"))
    (tmp_path / "gpu.yaml").write_text("device: cuda:999\n")
    (tmp_path / "typo.yaml").write_text("tau_verfy: 0.5\n")
    for name, words in [("latin1.yaml", ["latin1.yaml", "utf-8"]), ("missing.yaml", ["not found"]),
                        ("gpu.yaml", ["cuda:999"]), ("typo.yaml", ["tau_verfy", "tau_verify"])]:
        r = run("track", frames, "--init-mask", annotations / "00000.png", "--out", tmp_path / "o",
                "--config", tmp_path / name, "--quiet")
        assert r.returncode == 2, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        assert all(w in r.stderr for w in words), (name, r.stderr)


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
