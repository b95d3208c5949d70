"""scripts/gpu_bench.sh end to end in its dry mode (CPU, tiny sizes, a few frames per stage): every
stage runs through the existing bench code and lands in the JSON and the markdown table."""
import json
import os
import subprocess
import sys
from pathlib import Path

from hqsmem_ros.tools.gpu_bench import main

ROOT = Path(__file__).parent.parent


def test_dry_run_writes_every_figure(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_bench.sh"), "--dry"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["dry"] is True
    stages = report["stages"]
    assert set(stages) == {"dino", "hqsmem_step", "hqsmem_memory", "sam2", "sam2_memory"}
    assert report["concurrent"] == ["hqsmem_memory", "sam2_memory"]  # the child process's result came back
    assert not [k for k, v in stages.items() if "error" in v]
    step, mem, sam2 = stages["hqsmem_step"], stages["hqsmem_memory"], stages["sam2"]
    assert step["objects"] == 5 and step["full_ms"] > 0 and step["base_ms"] > 0
    assert abs(step["full_over_base"] / (step["full_ms"] / step["base_ms"]) - 1) < 0.01
    assert set(mem["full_mb_at"]) >= {"2", "3"} and mem["full_growth_pct"] is not None
    assert mem["base_growth_pct"] is not None
    for key in ("ours_over_predictor", "five_over_one", "ours_growth_pct", "predictor_growth_pct"):
        assert sam2[key] is not None, key
    assert stages["sam2_memory"]["ours_frames"] == 4 and stages["sam2_memory"]["ours_growth_pct"] is not None
    assert stages["dino"]["cpu"]["official_ms"] > 0 and stages["dino"]["cpu"]["previous_ms"] > 0
    table = (tmp_path / "gpu_bench.md").read_text()
    assert "DRY RUN" in table
    for figure in ("Full HQ-SMem 96x64, 5 objects", "Full HQ-SMem / base tracker step", "GPU memory, full HQ-SMem",
                   "base tracker's own rule", "5-object / 1-object step", "SAM2's predictor latency",
                   "SAM 2.1 tiny streaming: GPU memory frame 4", "SAM2's own predictor: GPU memory", "DINO feature step (cpu"):
        assert figure in table, figure


def test_unknown_stage_and_missing_gpu_are_refused(tmp_path, capsys):
    assert main(["--dry", "--out", str(tmp_path), "--stages", "nope"]) == 2
    assert "unknown stage 'nope'" in capsys.readouterr().err
    import torch
    if not torch.cuda.is_available():
        assert main(["--out", str(tmp_path)]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
