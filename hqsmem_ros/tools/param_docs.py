"""docs/ros.md's parameter tables, generated from their owners (ROS-free):

- the node's own parameters: ros/param_table.py (NODE_PARAMS);
- `pipeline.<key>`: PipelineConfig's fields (core/config.py), and a model block's own keys
  (`pipeline.<tracker|refiner|features>.precision`: ModelBlockSettings, core/config.py);
- `pipeline.<tracker|refiner|features>.<key>`: each registered model's Settings (its model file).

The tables sit between two HTML comments in docs/ros.md; `--write` rewrites that block, `--check`
fails when it differs from what the settings give (test/test_param_docs.py does the same).

  python -m hqsmem_ros.tools.param_docs --write docs/ros.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, List, Optional

from hqsmem_ros.core import registry
from hqsmem_ros.core.config import ModelBlockSettings, PipelineConfig
from hqsmem_ros.core.pipeline import HQSMemPipeline
from hqsmem_ros.core.settings import SettingInfo, settings_info
from hqsmem_ros.ros.param_table import NODE_PARAMS

BEGIN = "<!-- BEGIN generated parameter tables: python -m hqsmem_ros.tools.param_docs --write docs/ros.md -->"
END = "<!-- END generated parameter tables -->"
COMPONENT_KEYS = ("tracker", "refiner", "features")


def _value(v: Any) -> str:
    """A default as a YAML parameter file writes it."""
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if isinstance(v, str):
        return f"`{v}`" if v else '`""`'
    if isinstance(v, (tuple, list)):
        return "`[" + ", ".join(str(x) for x in v) + "]`"
    return f"`{v}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def _node_rows() -> List[str]:
    rows = []
    for name, p in NODE_PARAMS.items():
        meaning = p.description
        if p.choices:
            meaning += f" (one of: {', '.join(p.choices)})"
        r = p.int_range or p.float_range
        if r:
            meaning += f" ({_num(r[0])}..{_num(r[1])})"
        rows.append(f"| `{name}` | {_value(p.default)} | {'yes' if p.runtime else 'no'} | {_cell(meaning)} |")
    rows.append("| `use_sim_time` | `false` | yes (declared by rclpy) | Use `/clock` (bag replay with `--clock`) |")
    return rows


def _meaning(info: SettingInfo) -> str:
    return _cell(f"{info.description} ({info.allowed()})")


def _pipeline_rows() -> List[str]:
    rows = []
    for info in settings_info(PipelineConfig):
        if info.name in COMPONENT_KEYS:
            names = ", ".join(f"`{n}`" for n in registry.names(info.name))
            rows.append(f"| `pipeline.{info.name}.type` | {_value(info.default['type'])} | no | "
                        f"{_cell(info.description)} (one of {names}) |")
            continue
        runtime = "yes" if info.name in HQSMemPipeline.RUNTIME_KEYS else "no"
        rows.append(f"| `pipeline.{info.name}` | {_value(info.default)} | {runtime} | {_meaning(info)} |")
        if info.name == "precision":  # the block keys that override it
            for kind in COMPONENT_KEYS:
                for block in settings_info(ModelBlockSettings):
                    rows.append(f"| `pipeline.{kind}.{block.name}` | {_value(block.default)} | no | "
                                f"{_meaning(block)} |")
    return rows


def _model_tables() -> List[str]:
    out = ["#### Model settings", "",
           "The settings of each registered model, `pipeline.<tracker|refiner|features>.<key>` (in a "
           "parameter file: the keys beside `type`). The node declares those of the configured models, "
           "read-only while it runs; a key the model does not take, or a value outside what it allows, "
           "stops the start with the model's message (as `hqsmem track` does).", ""]
    for kind in COMPONENT_KEYS:
        for name in registry.names(kind):
            module = registry.model_class(kind, name).__module__.replace(".", "/") + ".py"
            out += [f"`{kind}: {name}` ({module})", "", "| key | default | meaning |", "|---|---|---|"]
            for info in settings_info(registry.settings_class(kind, name)):
                out.append(f"| `{info.name}` | {_value(info.default)} | {_meaning(info)} |")
            out.append("")
    return out


def render() -> str:
    """The generated block, markers included."""
    lines = [BEGIN, "| parameter | default | changeable at runtime | meaning |", "|---|---|---|---|"]
    lines += _node_rows() + _pipeline_rows() + [""] + _model_tables() + [END]
    return "\n".join(lines)


def replace_block(text: str, block: str, where: str = "the document") -> str:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{where} has no generated-table markers ({BEGIN!r} ... {END!r})")
    return text[:start] + block + text[end + len(END):]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", help="rewrite the marked block of FILE (docs/ros.md)")
    group.add_argument("--check", metavar="FILE", help="exit 1 if FILE's marked block differs")
    args = ap.parse_args(argv)
    block = render()
    if not (args.write or args.check):
        print(block)
        return 0
    path = Path(args.write or args.check)
    text = path.read_text(encoding="utf-8")
    new = replace_block(text, block, str(path))
    if args.check:
        if new != text:
            print(f"{path}: the parameter tables differ from the settings; run "
                  f"python -m hqsmem_ros.tools.param_docs --write {path}", file=sys.stderr)
            return 1
        return 0
    if new != text:
        path.write_text(new, encoding="utf-8")
    print(f"{path}: parameter tables {'rewritten' if new != text else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
