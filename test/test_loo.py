"""Leave-one-out parameter choice (`hqsmem loo`): the selection rule and a run on tiny synthetic data."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hqsmem_ros.core.config import ConfigError, load_config
from hqsmem_ros.data.synth import write_sequence
from hqsmem_ros.loo import apply_overrides, leave_one_out

HQSMEM = [sys.executable, "-m", "hqsmem_ros.cli"]


def test_a_parameter_is_never_chosen_on_the_sequence_it_is_scored_on():
    # A is excellent on s1 only; B is steady. Held out s1, the others prefer B; held out s2 or
    # s3, the others (with s1) prefer A.
    scores = {"A": {"s1": 0.9, "s2": 0.5, "s3": 0.5}, "B": {"s1": 0.6, "s2": 0.6, "s3": 0.6}}
    r = leave_one_out(scores)
    assert {s: p["chosen"] for s, p in r["loo"].items()} == {"s1": "B", "s2": "A", "s3": "A"}
    assert r["loo_mean"] == pytest.approx((0.6 + 0.5 + 0.5) / 3)
    assert r["final"] == "A" and r["final_mean"] == pytest.approx(1.9 / 3)
    assert r["oracle_mean"] == pytest.approx((0.9 + 0.6 + 0.6) / 3)
    assert r["loo_mean"] < r["final_mean"] < r["oracle_mean"]


def test_leave_one_out_refuses_what_it_cannot_do():
    with pytest.raises(ValueError):
        leave_one_out({"A": {"s1": 0.5}})
    with pytest.raises(ValueError):
        leave_one_out({"A": {"s1": 0.5, "s2": 0.4}, "B": {"s1": 0.5, "s3": 0.4}})


def test_overrides_merge_into_components():
    base = load_config({"tracker": {"type": "flow", "smooth": 7}})
    cfg = apply_overrides(base, {"tracker": {"match_size": 24}, "tau_verify": 0.8})
    assert cfg.tracker == {"type": "flow", "smooth": 7, "match_size": 24}
    assert cfg.tau_verify == 0.8
    assert apply_overrides(base, {"refiner": {"type": "color"}}).refiner == {"type": "color"}
    with pytest.raises(ConfigError):
        apply_overrides(base, {"no_such_key": 1})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("loo")
    for name, seed in (("translate_scale", 1), ("rotate_occlude", 2), ("split", 3)):
        write_sequence(root, name, seed, (128, 96), 12, 2)
    return root


def test_loo_command_on_a_tiny_synthetic_dataset(tiny, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: {ablation: base}\nfull: {ablation: full}\n")
    r = subprocess.run([*HQSMEM, "loo", tiny, "--grid", grid, "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    seqs = out["sequences"]
    assert sorted(seqs) == ["rotate_occlude", "split", "translate_scale"]
    scores = out["scores"]
    for s in seqs:
        others = {c: sum(scores[c][o] for o in seqs if o != s) for c in scores}
        best = max(others.values())
        chosen = out["loo"][s]["chosen"]
        assert others[chosen] == best and chosen == next(c for c in scores if others[c] == best)
        assert out["loo"][s]["score"] == scores[chosen][s]
    # The same rows scored by `hqsmem ablate` give the same per-sequence figures.
    a = subprocess.run([*HQSMEM, "ablate", tiny, "--rows", "base", "full", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert a.returncode == 0, a.stderr
    rows = json.loads(a.stdout)["rows"]
    for c in ("base", "full"):
        for s in seqs:
            assert scores[c][s] == pytest.approx(rows[c]["per_sequence"][s]["JF"])


def test_loo_bad_grid_is_a_one_line_error(tiny, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("a: {tau_verfy: 0.5}\nb: {}\n")
    r = subprocess.run([*HQSMEM, "loo", tiny, "--grid", grid], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "tau_verfy" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*HQSMEM, "loo", tiny, "--grid", tmp_path / "none.yaml"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "none.yaml" in r.stderr


def test_ablate_stride_keeps_every_nth_frame(tiny):
    from hqsmem_ros.ablation import run_ablation, run_sequence
    from hqsmem_ros.eval.davis_io import list_frames, list_labels, read_frame, read_label
    from hqsmem_ros.eval.metrics import evaluate_sequence_arrays

    out = run_ablation(tiny, rows=["base"], stride=3)
    assert out["stride"] == 3
    seq = "split"
    frames = [read_frame(p) for p in list_frames(tiny / "JPEGImages" / seq)][::3]
    gts = [read_label(p) for p in list_labels(tiny / "Annotations" / seq)][::3]
    assert len(frames) == 4  # 12 frames: 0, 3, 6, 9
    preds, _ = run_sequence(load_config({"ablation": "base"}), frames, gts)
    assert out["rows"]["base"]["per_sequence"][seq]["JF"] == pytest.approx(evaluate_sequence_arrays(preds, gts)["JF"])
    r = subprocess.run([*HQSMEM, "ablate", tiny, "--stride", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "stride" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("grid_file", sorted((Path(__file__).resolve().parents[1] / "config" / "loo").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_grid_candidate_is_a_valid_config(grid_file):
    """A candidate with a misspelt or out-of-range model setting would only fail minutes into a
    `hqsmem loo` run: every shipped candidate parses against its models' Settings up front."""
    from hqsmem_ros.core import registry
    from hqsmem_ros.core.config import load_config
    from hqsmem_ros.loo import apply_overrides, load_grid
    base = load_config(Path(__file__).resolve().parents[1] / "config" / "track.yaml")
    grid = load_grid(grid_file)
    assert grid
    for name, overrides in grid.items():
        cfg = apply_overrides(base, overrides)
        for kind in ("tracker", "refiner", "features"):
            spec = dict(getattr(cfg, kind))
            registry.model_class(kind, spec.pop("type")).parse_settings(spec)
