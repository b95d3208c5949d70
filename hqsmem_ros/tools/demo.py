"""Scoring step of scripts/demo.sh (ROS-free): the recorder's label images, named by stamp, are
matched to the synthetic camera's frames through stamps.csv and scored against the truth.

  python -m hqsmem_ros.tools.demo --truth out/demo/truth --labels out/demo/labels_by_stamp --pred out/demo/pred
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from hqsmem_ros.eval.davis_io import read_label, write_label
from hqsmem_ros.eval.metrics import evaluate, format_table


def collect_predictions(truth_dir: Path, labels_dir: Path, pred_dir: Path) -> dict:
    """Copy <stamp_ns>.png to <frame>.png for every camera frame with a result."""
    pred_dir.mkdir(parents=True, exist_ok=True)
    lines = (truth_dir / "stamps.csv").read_text(encoding="utf-8").split("\n")[1:]
    frames = [tuple(int(v) for v in line.split(",")) for line in lines if line.strip()]
    found = 0
    for frame, stamp_ns in frames:
        src = labels_dir / f"{stamp_ns}.png"
        if src.is_file():
            write_label(pred_dir / f"{frame:05d}.png", read_label(src))
            found += 1
    return {"frames": len(frames), "with_result": found}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--truth", required=True, type=Path, help="the camera's out_dir (labels/, stamps.csv)")
    ap.add_argument("--labels", required=True, type=Path)
    ap.add_argument("--pred", required=True, type=Path)
    ap.add_argument("--json", type=Path, help="also write the scores here")
    args = ap.parse_args(argv)
    counts = collect_predictions(args.truth, args.labels, args.pred)
    result = evaluate(args.pred, args.truth / "labels")
    print(format_table(result))
    print(f"results for {counts['with_result']} of {counts['frames']} frames; "
          f"J&F = {result['JF']:.3f}  Q = {result['Q']:.3f}  identity switches = {result['id_switches']}")
    if args.json:
        keys = ("J", "F", "JF", "Q", "id_switches")
        args.json.write_text(json.dumps({**counts, **{k: result[k] for k in keys}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
