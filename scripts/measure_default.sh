#!/usr/bin/env bash
# Every figure of the default profile (config/track.yaml) in docs/benchmarks.md and README, in
# one go, one job at a time: DAVIS leave-one-out and ablation rows, the stride-3 stress test, the
# synthetic suite's ablation rows, the README demo's scene, the camera perturbations, and the
# one-core bench.
#   bash scripts/measure_default.sh [OUT_DIR]     (needs ../shared/vos_data, or VOS_DATA=DIR; about 15 min)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/hqsmem_measure}
data=${VOS_DATA:-../shared/vos_data}
cfg=config/track.yaml
hq="python -m hqsmem_ros.cli"
mkdir -p "$out"
run() { echo "== $*" >&2; "$@"; }
run $hq synth /tmp/syn --seed 0 > "$out/synth.txt"
run $hq loo "$data" --grid config/loo/track_grid.yaml --config $cfg | tee "$out/loo_track_grid.txt"
run $hq ablate "$data" --config $cfg --json > "$out/ablate_davis.json"
run $hq ablate /tmp/syn --config $cfg --json > "$out/ablate_synth.json"
python - "$out" <<'PY' | tee "$out/tables.txt"
import json, sys
from hqsmem_ros.ablation import format_ablation
for name in ("ablate_davis", "ablate_synth"):
    r = json.load(open(f"{sys.argv[1]}/{name}.json"))
    print(format_ablation(r))
    print(name, "JF / IDsw per sequence:", ", ".join(r["sequences"]))
    for row, s in r["rows"].items():
        ps = s["per_sequence"]
        print(f"| {row} | {s['JF']:.4f} / {s['id_switches']} | " + " | ".join(
            f"{ps[q]['JF']:.3f} / {ps[q]['id_switches']}" for q in r["sequences"]) + " |")
PY
python - $cfg <<'PY' | tee "$out/demo.txt"
import sys
from hqsmem_ros.ablation import run_sequence
from hqsmem_ros.core.config import load_config
from hqsmem_ros.data.synth import make_sequence
from hqsmem_ros.eval.metrics import evaluate_sequence_arrays
frames, gts = make_sequence("demo", 0, (640, 480), 150, 3)
for row in ("base", "full"):
    cfg = load_config(sys.argv[1]).replace(ablation=row, refine=None, teacher_forcing=None, smart_memory=None)
    r = evaluate_sequence_arrays(run_sequence(cfg, frames, gts)[0], gts)
    print(f"demo scene, {row}: J&F {r['JF']:.3f}, Q {r['Q']:.3f}, IDsw {r['id_switches']}")
PY
run $hq ablate "$data" --stride 3 --rows base full --config $cfg | tee "$out/stride3.txt"
# The same sequences as a robot camera gives them (JPEG 50, noise, exposure, ...; about 3 min):
run python -m hqsmem_ros.eval.perturb "$data" --config $cfg | tee "$out/perturb.txt"
run $hq bench --size 640x480 --objects 3 --frames 300 --config $cfg | tee "$out/bench.txt"
# The 10,000-frame memory run (about 8 min more): LONG=1 bash scripts/measure_default.sh
if [ "${LONG:-0}" = 1 ]; then
  run $hq bench --size 640x480 --objects 3 --frames 10000 --json --config $cfg > "$out/bench_10000.json"
fi
