"""Camera perturbations of `python -m hqsmem_ros.eval.perturb`: applied as described, deterministic,
scored against the original annotations."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hqsmem_ros.ablation import run_sequence
from hqsmem_ros.core.config import load_config
from hqsmem_ros.data.synth import make_sequence, write_sequence
from hqsmem_ros.eval.metrics import evaluate_sequence_arrays
from hqsmem_ros.eval.perturb import KINDS, perturb, score_perturbed

TRACK = str(Path(__file__).resolve().parents[1] / "config" / "track.yaml")


@pytest.fixture(scope="module")
def seq():
    return make_sequence("translate_scale", 1, (128, 96), 40, 2)


def test_every_kind_is_deterministic_and_the_seed_matters(seq):
    frames, gts = seq
    for kind in KINDS:
        a, b = perturb(kind, frames, gts, "s", 0), perturb(kind, frames, gts, "s", 0)
        assert a.kept == b.kept
        assert all(np.array_equal(x, y) for x, y in zip(a.frames, b.frames)), kind
    other = perturb("noise", frames, gts, "s", 1)
    assert not np.array_equal(other.frames[3], perturb("noise", frames, gts, "s", 0).frames[3])
    assert perturb("drop", frames, gts, "s", 0).kept != perturb("drop", frames, gts, "s", 1).kept


def test_clean_is_the_input_and_the_others_change_pixels_not_labels(seq):
    frames, gts = seq
    clean = perturb("clean", frames, gts)
    assert all(np.array_equal(x, y) for x, y in zip(clean.frames, frames))
    for kind in ("jpeg50", "noise", "exposure", "dark", "robot"):
        p = perturb(kind, frames, gts, "s")
        assert p.kept == list(range(len(frames)))
        assert all(np.array_equal(x, y) for x, y in zip(p.prompts, gts))
        diff = np.abs(p.frames[5].astype(int) - frames[5].astype(int))
        assert p.frames[5].shape == frames[5].shape and p.frames[5].dtype == np.uint8
        assert diff.mean() > 0.5, kind


def test_exposure_ramps_from_dark_to_bright(seq):
    frames, gts = seq
    p = perturb("exposure", frames, gts)
    ratios = [p.frames[k].astype(float).mean() / frames[k].astype(float).mean() for k in range(len(frames))]
    assert ratios[0] == pytest.approx(0.6, abs=0.02)
    assert ratios[-1] > 1.2  # 1.4 but for the clipped highlights
    assert all(b >= a - 1e-6 for a, b in zip(ratios, ratios[1:]))


def test_dark_is_a_constant_underexposure(seq):
    frames, gts = seq
    p = perturb("dark", frames, gts)
    for k in (0, len(frames) - 1):
        assert p.frames[k].astype(float).mean() / frames[k].astype(float).mean() == pytest.approx(0.6, abs=0.02)


def test_noise_grows_with_the_pixel_value():
    dark, bright = np.full((200, 200, 3), 20, np.uint8), np.full((200, 200, 3), 220, np.uint8)
    frames = [dark, bright]
    p = perturb("noise", frames, [np.zeros((200, 200), np.uint8)] * 2)
    std_dark, std_bright = (p.frames[k].astype(float).std() for k in range(2))
    assert 3.5 < std_dark < std_bright < 9.5


def test_half_resolution_halves_frames_and_prompt_masks(seq):
    frames, gts = seq
    p = perturb("half", frames, gts)
    assert p.frames[0].shape == (48, 64, 3) and p.prompts[0].shape == (48, 64)
    assert set(np.unique(p.prompts[0])) == set(np.unique(gts[0]))


def test_dropped_frames_keep_the_prompt_frames():
    frames, gts = make_sequence("translate_scale", 2, (64, 64), 200, 2)
    gts = [g.copy() for g in gts]
    gts[0][gts[0] == 2] = 0  # object 2 first appears on frame 1: that frame must arrive
    p = perturb("drop", frames, gts, "s")
    assert p.kept[:2] == [0, 1]
    assert 0.15 < 1 - len(p.kept) / len(frames) < 0.35
    assert all(np.array_equal(frames[k], f) for k, f in zip(p.kept, p.frames))


def test_bad_input_is_refused(seq):
    frames, gts = seq
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb("fog", frames, gts)
    with pytest.raises(ValueError, match="as many label maps"):
        perturb("clean", frames, gts[:-1])


def test_scores_are_against_the_original_annotations(seq):
    frames, gts = seq
    cfg = load_config(None)
    direct = evaluate_sequence_arrays(run_sequence(cfg, frames, gts)[0], gts)["JF"]
    assert score_perturbed(cfg, frames, gts, "clean")["JF"] == pytest.approx(direct)
    half = score_perturbed(cfg, frames, gts, "half")  # masks scaled back up to be scored
    assert 0.5 < half["JF"] <= 1.0
    dropped = score_perturbed(cfg, frames, gts, "drop", "s")
    assert dropped["n_frames"] == len(perturb("drop", frames, gts, "s").kept)


def test_command_prints_one_table_per_config(tmp_path):
    write_sequence(tmp_path, "translate_scale", 1, (96, 64), 8, 2)
    write_sequence(tmp_path, "split", 2, (96, 64), 8, 2)
    cmd = [sys.executable, "-m", "hqsmem_ros.eval.perturb", str(tmp_path), "--config", TRACK,
           "--kinds", "clean", "jpeg50", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    scores = out["scores"][TRACK]
    assert set(scores) == {"clean", "jpeg50"} and sorted(out["sequences"]) == ["split", "translate_scale"]
    assert all(0.0 <= v <= 1.0 for per_seq in scores.values() for v in per_seq.values())
    bad = subprocess.run([*cmd[:-3], "fog"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "fog" in bad.stderr
