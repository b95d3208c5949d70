"""docs/ros.md's parameter tables are generated from the settings (tools/param_docs.py): the
file must hold exactly what the generator gives, and the generator must cover every parameter."""
from pathlib import Path

from hqsmem_ros.core import registry
from hqsmem_ros.core.config import ModelBlockSettings, PipelineConfig
from hqsmem_ros.core.settings import settings_info
from hqsmem_ros.ros.param_table import NODE_PARAMS
from hqsmem_ros.tools import param_docs

DOC = Path(__file__).resolve().parents[1] / "docs" / "ros.md"


def _block(text):
    return text[text.index(param_docs.BEGIN):text.index(param_docs.END) + len(param_docs.END)]


def test_docs_ros_md_holds_the_generated_tables():
    assert _block(DOC.read_text(encoding="utf-8")) == param_docs.render(), (
        "docs/ros.md's parameter tables differ from the settings: run "
        "python -m hqsmem_ros.tools.param_docs --write docs/ros.md")


def test_every_parameter_has_a_row_with_its_default_and_constraints():
    block = param_docs.render()
    rows = {}
    for line in block.splitlines():
        if line.startswith("| `"):
            rows.setdefault(line.split("|")[1].strip().strip("`"), []).append([c.strip() for c in line.split("|")])
    for name, p in NODE_PARAMS.items():
        cells = rows[name][0]
        default = {True: "true", False: "false"}.get(p.default, p.default) if isinstance(p.default, bool) else p.default
        assert cells[2] == ('`""`' if default == "" else f"`{default}`"), (name, cells[2])
        assert cells[3].startswith("yes" if p.runtime else "no"), (name, cells[3])
        assert cells[4].startswith(p.description.replace("|", "\\|")[:40]), name
        if p.int_range:
            assert f"({p.int_range[0]}..{p.int_range[1]})" in cells[4], (name, cells[4])
    for info in settings_info(PipelineConfig):
        key = f"pipeline.{info.name}.type" if isinstance(info.default, dict) else f"pipeline.{info.name}"
        assert info.description.replace("|", "\\|") in rows[key][0][4], key
    for kind in ("tracker", "refiner", "features"):  # a model block's own keys
        for info in settings_info(ModelBlockSettings):
            assert rows[f"pipeline.{kind}.{info.name}"][0][4] == f"{info.description} ({info.allowed()})"
    for kind in ("tracker", "refiner", "features"):
        for name in registry.names(kind):
            assert f"`{kind}: {name}`" in block
            for info in settings_info(registry.settings_class(kind, name)):
                meanings = [r[3] for r in rows[info.name]]
                assert f"{info.description} ({info.allowed()})".replace("|", "\\|") in meanings, (name, info.name)


def test_check_fails_on_a_stale_copy_and_write_fixes_it(tmp_path, capsys):
    stale = tmp_path / "ros.md"
    text = DOC.read_text(encoding="utf-8")
    stale.write_text(text.replace("Smart memory size K", "Memory size"), encoding="utf-8")
    assert param_docs.main(["--check", str(stale)]) == 1
    assert "differ" in capsys.readouterr().err
    assert param_docs.main(["--write", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == text
    assert param_docs.main(["--check", str(stale)]) == 0
