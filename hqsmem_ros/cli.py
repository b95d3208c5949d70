"""`hqsmem`: the command line of hqsmem_ros.

  hqsmem track FRAMES_DIR --init-mask MASK.png --out OUT_DIR [--config FILE]
  hqsmem eval PRED_DIR GT_DIR [--json]
  hqsmem synth OUT_DIR --seed N
  hqsmem bench [--size WxH --objects N --frames F --json]
  hqsmem ablate DATA_DIR [--rows ...] [--json]
  hqsmem loo DATA_DIR --grid GRID.yaml [--config FILE] [--json]
  hqsmem bag IN_BAG OUT_BAG --image-topic TOPIC [--prompts FILE | --prompt-topic TOPIC]
  hqsmem bags INPUT... --out DIR [--workers N | --ray ADDRESS] [--force]   (hqsmem_ros/fleet/)
  hqsmem node [--config FILE] [--ros-args ...]     (needs rclpy)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def _size(text: str):
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w < 8 or h < 8:
            raise ValueError
        return w, h
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 640x480, got {text!r}")


def cmd_track(args) -> int:
    import numpy as np

    from .core.config import load_config
    from .core.pipeline import HQSMemPipeline
    from .eval.davis_io import list_frames, read_frame, read_label
    from .staging import make_staging
    from .stream.session import StreamSession

    frames = list_frames(args.frames_dir)
    init = read_label(args.init_mask)
    ids = [int(i) for i in np.unique(init) if i != 0]
    if not ids:
        raise CliError(f"{args.init_mask}: the first-frame mask is empty (no object id > 0)")
    cfg = load_config(args.config)
    if args.offline_interval:
        cfg = cfg.replace(sequence_length=len(frames))
    out = Path(args.out)
    # Results go to a hidden sibling folder first and are moved in only when every frame is done:
    # a failed run leaves nothing that looks like complete output.
    try:
        out.mkdir(parents=True, exist_ok=True)
        partial = make_staging(out, ".partial-")  # removes killed runs' folders first
    except OSError as exc:
        raise CliError(f"cannot write to output folder {out}: {exc.strerror or exc}")
    try:
        errors: List[str] = []
        # One stream like the node's, but frames have no stamps, and one sequence has one size:
        # a frame of another size is an error naming it, not a reset.
        session = StreamSession(HQSMemPipeline(cfg), initial_labels=init, reset_on_size_change=False,
                                log=lambda level, text: errors.append(text) if level == "error" else None)
        for k, path in enumerate(frames):
            image = read_frame(path)
            if k == 0 and init.shape != image.shape[:2]:
                raise CliError(f"{args.init_mask} is {init.shape[1]}x{init.shape[0]} but frame {path} is "
                               f"{image.shape[1]}x{image.shape[0]}")
            result = _track_frame(session, image, path, out, partial)
            if k == 0 and list(session.live_ids) != ids:  # the first mask's objects were refused
                raise CliError(f"{args.init_mask}: {errors[-1] if errors else 'objects not started'}")
            if not args.quiet and (k % 50 == 0 or k == len(frames) - 1):
                print(f"frame {k + 1}/{len(frames)} objects visible: "
                      f"{sum(o.visible for o in result.objects)}/{len(result.objects)}", file=sys.stderr)
        try:
            for f in sorted(partial.iterdir()):
                os.replace(f, out / f.name)
        except OSError as exc:
            raise CliError(f"cannot move the results into {out}: {exc.strerror or exc}")
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {len(frames)} label images to {out}")
    return 0


def _track_frame(session, image, path: Path, out: Path, partial: Path):
    """One frame of `hqsmem track` through the session, its label image written to `partial`;
    a frame it drops (too small, another size) is an error naming the file."""
    from .eval import davis_io

    step = session.step(image, None)
    if step.result is None:
        raise CliError(f"{path}: {step.detail}")
    try:
        davis_io.write_label(partial / (path.stem + ".png"), step.result.label_map())
    except OSError as exc:  # a full disk (ENOSPC), quota, I/O error: one line, exit 2
        raise CliError(f"cannot write the result for {path.name} in {out}: {exc.strerror or exc}"
                       "; nothing was written to the output folder")
    return step.result


def cmd_eval(args) -> int:
    from .eval.metrics import evaluate, format_table

    result = evaluate(args.pred_dir, args.gt_dir)
    if args.json:
        keys = ("J", "F", "JF", "Q", "Acc", "Rob", "NRE", "DRE", "ADQ", "id_switches")
        summary = {k: result[k] for k in keys if k in result}
        summary["id_switches_per_sequence"] = {n: s["id_switches"] for n, s in result["sequences"].items()}
        print(json.dumps(summary))
    else:
        print(format_table(result))
    if args.plot:
        from .eval.plots import plot_eval
        for p in plot_eval(result, args.plot):
            print(f"wrote {p}", file=sys.stderr)
    return 0


def cmd_synth(args) -> int:
    from .data.synth import write_suite

    names = write_suite(args.out_dir, seed=args.seed, size=args.size)
    print(f"wrote {len(names)} sequences to {args.out_dir}: {', '.join(names)}")
    return 0


def cmd_bench(args) -> int:
    from .tools.bench import run_bench

    report = run_bench(size=args.size, objects=args.objects, frames=args.frames, config=args.config,
                       one_core=not args.all_cores, seed=args.seed, random_weights=args.random_weights,
                       device=args.device, precision=args.precision)
    if args.json:
        print(json.dumps(report))
    else:
        from .tools.bench import format_report
        print(format_report(report))
    if args.plot:
        from .eval.plots import plot_bench
        for p in plot_bench(report, args.plot):
            print(f"wrote {p}", file=sys.stderr)
    return 0


def cmd_ablate(args) -> int:
    from .ablation import format_ablation, run_ablation

    result = run_ablation(args.data_dir, rows=args.rows, config=args.config, stride=args.stride)
    print(json.dumps(result) if args.json else format_ablation(result))
    return 0


def cmd_loo(args) -> int:
    from .loo import format_loo, load_grid, run_loo

    result = run_loo(args.data_dir, load_grid(args.grid), config=args.config, metric=args.metric)
    print(json.dumps(result) if args.json else format_loo(result))
    return 0


def cmd_bag(args) -> int:
    try:
        from .bag import BagError, process_bag
    except ImportError as exc:
        raise CliError(f"hqsmem bag needs the rosbags library ({exc}); pip install rosbags")
    from .io.prompts_file import PromptsFileError

    try:
        summary = process_bag(args.in_bag, args.out_bag, args.image_topic, prompts_file=args.prompts,
                              prompt_topic=args.prompt_topic, config=args.config, overlay=args.overlay,
                              overlay_alpha=args.overlay_alpha, storage=args.storage, ns=args.ns,
                              exclude_topics=args.exclude_topic, progress=not args.quiet,
                              io_threads={"auto": None, "on": True, "off": False}[args.io_threads],
                              bench=args.bench,
                              allow_random_weights=args.allow_random_weights,
                              max_image_pixels=args.max_image_pixels, depth_topic=args.depth_topic,
                              depth_info_topic=args.depth_camera_info_topic)
    except (BagError, PromptsFileError) as exc:
        raise CliError(str(exc))
    print(json.dumps(summary.to_dict()) if args.json else summary.format())
    return 0


def cmd_bags(args) -> int:
    from .fleet import FleetError, run_from_args

    try:
        return run_from_args(args)
    except FleetError as exc:
        raise CliError(str(exc))


def cmd_node(argv: List[str]) -> int:
    try:
        from .ros.main import main as node_main
    except ImportError as exc:
        raise CliError(f"the ROS 2 node needs rclpy and the built interfaces ({exc}); "
                       "run scripts/setup_ros.sh or source your ROS 2 install")
    return node_main(argv) or 0


def _add_bag_parser(sub) -> None:
    p = sub.add_parser("bag", help="run the pipeline over a rosbag2 bag (mcap/sqlite3) and write an output bag")
    p.add_argument("in_bag", help="bag folder, or a single .mcap/.db3 file")
    p.add_argument("out_bag", help="output bag folder (must not exist)")
    p.add_argument("--image-topic", required=True, help="sensor_msgs/Image or CompressedImage topic")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prompts", metavar="PROMPTS.yaml", help="prompts file (docs/prompts.md)")
    group.add_argument("--prompt-topic", metavar="TOPIC",
                       help="hqsmem_ros/ObjectPromptArray topic in the bag; applied at their stamps")
    p.add_argument("--config", help="pipeline YAML (default: built-in weight-free CPU pipeline)")
    p.add_argument("--overlay", action="store_true", help="also write <ns>/overlay (rgb8)")
    p.add_argument("--overlay-alpha", type=float, default=0.5)
    p.add_argument("--storage", choices=["mcap", "sqlite3"], help="output storage (default: as the input)")
    p.add_argument("--ns", default="/hqsmem_node", help="namespace of the output topics (the node's name)")
    p.add_argument("--exclude-topic", action="append", default=[], metavar="TOPIC",
                   help="input topic not to copy to the output (repeatable)")
    p.add_argument("--bench", action="store_true",
                   help="first run the pipeline alone over the frames, and report this run against it")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="run a config whose models have random_weights: true (speed tests only)")
    p.add_argument("--max-image-pixels", type=int, metavar="N",
                   help="images over N pixels (width x height, read from the message or the "
                        "compressed header before decoding) are dropped as bad_image "
                        "(default: 40000000, as the node's max_image_pixels)")
    p.add_argument("--depth-topic", metavar="TOPIC",
                   help="aligned depth images (16UC1 mm or 32FC1 m, registered to the colour image): "
                        "adds the node's 3D fields to <ns>/objects (as use_depth: true, depth_wait 0)")
    p.add_argument("--depth-camera-info-topic", metavar="TOPIC",
                   help="the depth image's camera_info (default: camera_info beside --depth-topic)")
    p.add_argument("--io-threads", choices=["auto", "on", "off"], default="auto",
                   help="read/decode and encode/write in threads beside the pipeline (auto: with >= 2 "
                        "cores); off: only image decoding runs beside it, one frame ahead")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_bag)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hqsmem", description="HQ-SMem video object segmentation and tracking")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("track", help="track the objects of a first-frame mask through a folder of frames")
    p.add_argument("frames_dir")
    p.add_argument("--init-mask", required=True, help="label PNG of the first frame (values = object ids)")
    p.add_argument("--out", required=True, help="folder for one label PNG per frame")
    p.add_argument("--config", help="pipeline YAML (default: built-in weight-free CPU pipeline)")
    p.add_argument("--offline-interval", action="store_true",
                   help="memory candidates every L/30 frames (L = sequence length), as the paper offline")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_track)

    p = sub.add_parser("eval", help="DAVIS J/F and VOTS measures of predictions against ground truth")
    p.add_argument("pred_dir")
    p.add_argument("gt_dir")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="DIR", help="also write per-object IoU plots to DIR")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("synth", help="write the synthetic suite (DAVIS layout) with exact ground truth")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=_size, default=(640, 480))
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("bench", help="frames/s, per-stage time and memory of the pipeline")
    p.add_argument("--size", type=_size, default=(640, 480))
    p.add_argument("--objects", type=int, default=3)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--all-cores", action="store_true", help="do not pin the process to one CPU core")
    p.add_argument("--device", help="override the config's device (cpu, cuda, cuda:N, auto)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                   help="override the config's pipeline precision (a model block's own precision still wins)")
    p.add_argument("--random-weights", action="store_true",
                   help="build neural models with random weights (timing only; masks are meaningless)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="DIR", help="also write memory/latency plots and report.html to DIR")
    p.set_defaults(func=cmd_bench)

    sub.add_parser("bench-sam2", add_help=False,
                   help="SAM 2.1's own video predictor vs the streaming tracker over a long stream "
                        "(memory, latency, 1 vs 5 objects); `hqsmem bench-sam2 --help`")

    p = sub.add_parser("ablate", help="the paper's 5 ablation rows (J&F, VOTS Q, ...) on a folder of sequences")
    p.add_argument("data_dir", help="DAVIS layout, or a folder of <seq>/JPEGImages + <seq>/Annotations")
    p.add_argument("--rows", nargs="+", choices=["base", "base_sam", "base_smem", "base_hqtf", "full"])
    p.add_argument("--config")
    p.add_argument("--stride", type=int, default=1,
                   help="keep every Nth frame of each sequence (N times the motion: a stress test)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("loo", help="leave-one-out parameter choice over a folder of sequences (hqsmem_ros/loo.py)")
    p.add_argument("data_dir", help="DAVIS layout, or a folder of <seq>/JPEGImages + <seq>/Annotations")
    p.add_argument("--grid", required=True, help="YAML: candidate name -> pipeline overrides")
    p.add_argument("--config", help="base pipeline YAML the candidates override")
    p.add_argument("--metric", default="JF", choices=["JF", "J", "F", "Q"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_loo)

    _add_bag_parser(sub)

    p = sub.add_parser("bags", help="many bags (or folders of bags) on all local cores, or on a Ray cluster")
    from .fleet import add_arguments
    add_arguments(p)
    p.set_defaults(func=cmd_bags)

    sub.add_parser("node", help="run the ROS 2 node (arguments after 'node' go to it)", add_help=False)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .core.config import ConfigError
    from .eval.davis_io import DataError

    from .malloc_tuning import reuse_large_buffers
    reuse_large_buffers()  # every command handles frames of a megabyte or more
    try:
        if argv[:1] == ["node"]:
            return cmd_node(argv[1:])
        if argv[:1] == ["bench-sam2"]:  # its own options (python -m hqsmem_ros.tools.bench_sam2)
            from .tools.bench_sam2 import main as bench_sam2_main
            return bench_sam2_main(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (CliError, ConfigError, DataError) as exc:
        print(f"hqsmem: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
