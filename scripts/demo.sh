#!/usr/bin/env bash
# The main job, on a machine with no ROS install: set up .venv with the ROS 2 wheels, then run
# three ROS 2 processes talking over DDS -- a synthetic camera, the tracking node with
# config/track.yaml (seeded from the first frame's label PNG, as VOS benchmarks do) and a recorder
# writing a rosbag2 file and an overlay video -- and score the tracking against the synthetic
# truth (J&F, Q, identity switches). Output: out/demo/ (bag/, overlay.mp4, pred/ label PNGs, truth/, logs).
#   bash scripts/demo.sh            FRAMES=150 SIZE=640x480 STORAGE=mcap|sqlite3 bash scripts/demo.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_venv.sh
bash scripts/setup_ros.sh

py="$root/.venv/bin/python"
out="$root/out/demo"
frames="${FRAMES:-150}"
size="${SIZE:-640x480}"
storage="${STORAGE:-mcap}"
width="${size%x*}"
height="${size#*x}"
# A DDS domain of our own, so other ROS 2 programs on this machine or network do not mix in.
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$((1 + $$ % 200))}"
rm -rf "$out"
mkdir -p "$out"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

start=$(date +%s)
echo "demo: $frames frames of ${width}x${height}, ROS_DOMAIN_ID=$ROS_DOMAIN_ID, logs in $out/*.log"

# 1. The camera writes the truth (truth/labels/*.png, truth/stamps.csv) at once, then waits for the node, the
#    recorder and the node's result topic before publishing; in lockstep it sends frame k+1 when
#    the result for frame k is out, so nothing is dropped whatever this machine's speed.
"$py" -m hqsmem_ros.tools.synthetic_camera --ros-args -p sequence:=demo -p seed:=0 \
  -p width:="$width" -p height:="$height" -p frames:="$frames" -p n_objects:=3 \
  -p out_dir:="$out/truth" -p lockstep:=true -p wait_for_topic:=/hqsmem_node/overlay \
  >"$out/camera.log" 2>&1 &
camera=$!
pids+=("$camera")
for _ in $(seq 600); do [ -f "$out/truth/stamps.csv" ] && break; sleep 0.1; done
[ -f "$out/truth/stamps.csv" ] || { echo "demo: the camera did not start; see $out/camera.log" >&2; exit 1; }

# 2. The recorder: rosbag2 + overlay video + label PNGs by stamp; stops after the last frame.
"$py" -m hqsmem_ros.tools.recorder --ros-args -p bag:="$out/bag" -p storage:="$storage" \
  -p video:="$out/overlay.mp4" -p labels_dir:="$out/labels_by_stamp" -p frames:="$frames" \
  -p idle_timeout:=30.0 >"$out/recorder.log" 2>&1 &
recorder=$!
pids+=("$recorder")

# 3. The tracking node, exactly as a user starts it without ROS installed.
"$py" -m hqsmem_ros.ros.main --config config/track.yaml --ros-args \
  -p initial_mask:="$out/truth/labels/00000.png" -p qos_reliability:=reliable >"$out/node.log" 2>&1 &
node=$!
pids+=("$node")

wait "$camera" || { echo "demo: camera failed; see $out/camera.log" >&2; exit 1; }
wait "$recorder" || { echo "demo: recorder failed; see $out/recorder.log" >&2; exit 1; }
kill -INT "$node" 2>/dev/null || true
wait "$node" || true
trap - EXIT
elapsed=$(( $(date +%s) - start ))

echo "demo: node:     $(grep -o 'stopped:.*' "$out/node.log" || echo 'see node.log')"
echo "demo: recorder: $(grep -o 'recorded.*' "$out/recorder.log" || echo 'see recorder.log')"
echo "demo: bag:      $(du -sh "$out/bag" | cut -f1) in $out/bag ($storage); video: $out/overlay.mp4"
"$py" -m hqsmem_ros.tools.demo --truth "$out/truth" --labels "$out/labels_by_stamp" --pred "$out/pred" \
  --json "$out/scores.json"
echo "demo: done in ${elapsed}s (after set-up)"
