"""`hqsmem bags`' planning: the bags of the inputs, where each one's output goes, and what an
output was made from (its manifest), so that complete outputs are skipped."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

MANIFEST_SUFFIX = ".hqsmem.json"
WORK_DIR = ".hqsmem-bags-work"
LOCK_NAME = ".hqsmem-bags.lock"
SUMMARY_NAME = "hqsmem_bags_summary.json"
MANIFEST_FORMAT = 1
BAG_SUFFIXES = (".mcap", ".db3")
IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
NEURAL_TYPES = ("deaot", "sam2", "sam_hq", "dino")
INSTALL_RAY = "pip install 'hqsmem_ros[cluster]' (or: pip install ray)"


class FleetError(ValueError):
    """A request that cannot run at all (no bags, bad options): one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Finding the bags


@dataclass
class Job:
    """One input bag and where its output goes; plain data, sent to the workers."""

    index: int
    name: str  # output name relative to DIR (a/b for DIR/a/b)
    in_bag: str
    out_bag: str
    work_bag: str
    manifest: str
    image_topic: str = ""
    prompts_file: Optional[str] = None
    prompt_topic: Optional[str] = None
    frames: int = 0  # images on the image topic, from the bag's metadata (0: unknown)
    key: Dict[str, Any] = field(default_factory=dict)  # what the manifest must match
    error: Optional[str] = None  # found while planning: the bag fails without running


def _is_bag_dir(p: Path) -> bool:
    return p.is_dir() and (p / "metadata.yaml").is_file()


def find_bags(inputs: Sequence[str], out_dir: Path) -> List[tuple]:
    """[(input bag path, output name)] in a stable order; FleetError for missing inputs,
    folders without bags and two bags that would get the same output name."""
    found: List[tuple] = []
    out_dir = out_dir.resolve()
    for text in inputs:
        p = Path(text)
        if not p.exists():
            raise FleetError(f"input not found: {p}")
        if p.is_file():
            if p.suffix not in BAG_SUFFIXES:
                raise FleetError(f"{p} is not a bag (a bag is a folder with metadata.yaml, or a .mcap/.db3 file)")
            found.append((p, p.stem))
        elif _is_bag_dir(p):
            found.append((p, p.resolve().name))
        else:
            inside = []
            for root, dirs, files in os.walk(p):
                r = Path(root)
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (r / d).resolve() != out_dir)
                for d in list(dirs):
                    if _is_bag_dir(r / d):
                        inside.append((r / d, (r / d).relative_to(p).as_posix()))
                        dirs.remove(d)  # a bag folder's own files are not bags of their own
                for f in sorted(files):
                    if Path(f).suffix in BAG_SUFFIXES and not f.startswith("."):
                        rel = (r / f).relative_to(p)
                        inside.append((r / f, rel.with_suffix("").as_posix()))
            if not inside:
                raise FleetError(f"no bags in folder {p} (a bag is a folder with metadata.yaml, or a .mcap/.db3 file)")
            found.extend(sorted(inside, key=lambda x: x[1]))
    names: Dict[str, Path] = {}
    for path, name in found:
        if name in names:
            raise FleetError(f"two inputs would both be written to {out_dir / name}: {names[name]} and {path}")
        names[name] = path
    return found


def _inspect(path: Path, image_topic: Optional[str]):
    """(image topic, images on it) from the bag's metadata; ("", 0) when it cannot be read
    (the worker's process_bag then reports why, in its own words). FleetError-like text for a
    bag whose image topic cannot be chosen."""
    from rosbags.rosbag2 import Reader

    try:
        reader = Reader(path)
        reader.open()
    except Exception:
        return image_topic or "", 0, None
    try:
        topics: Dict[str, List[Any]] = {}
        for c in reader.connections:
            topics.setdefault(c.topic, []).append(c)
        if image_topic is None:
            images = sorted(t for t, cs in topics.items() if cs[0].msgtype in IMAGE_TYPES)
            if len(images) != 1:
                what = ", ".join(images) if images else "none"
                return "", 0, (f"{path}: cannot choose the image topic (image topics: {what}); "
                               "give --image-topic")
            image_topic = images[0]
        frames = sum(c.msgcount for c in topics.get(image_topic, []))
        return image_topic, frames, None
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------------
# What an output was made from


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_stat(p: Path, name: Optional[str] = None) -> Dict[str, Any]:
    st = p.stat()
    return {"file": name or str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def input_files(bag: Path) -> List[Dict[str, Any]]:
    """Size and mtime of the bag's files (a changed or re-recorded bag is processed again)."""
    if bag.is_file():
        return [_file_stat(bag, bag.name)]
    return [_file_stat(f, f.relative_to(bag).as_posix()) for f in sorted(bag.rglob("*")) if f.is_file()]


def prompts_digest(path: Optional[Path]) -> Optional[str]:
    """sha256 over the prompts file and the mask PNGs it names (None without a file)."""
    if path is None:
        return None
    h = hashlib.sha256()
    try:
        text = path.read_bytes()
    except OSError:
        return "unreadable"
    h.update(text)
    try:
        import yaml
        data = yaml.safe_load(text) or {}
        masks = sorted({str(e["mask"]) for e in data.get("prompts", []) or [] if isinstance(e, dict) and "mask" in e})
    except Exception:  # the worker's process_bag reports what is wrong with the file
        masks = []
    for rel in masks:
        m = Path(rel) if Path(rel).is_absolute() else path.parent / rel
        h.update(rel.encode())
        try:
            h.update(hashlib.sha256(m.read_bytes()).digest())
        except OSError:
            h.update(b"missing")
    return h.hexdigest()


_CODE_DIGEST: Optional[str] = None


def code_digest() -> str:
    """sha256 of this package's Python files and message definitions: the code version."""
    global _CODE_DIGEST
    if _CODE_DIGEST is None:
        pkg = Path(__file__).resolve().parents[1]  # hqsmem_ros/
        h = hashlib.sha256()
        files = sorted(pkg.rglob("*.py")) + sorted((pkg.parent / "msg").glob("*.msg"))
        for f in files:
            h.update(f.relative_to(pkg.parent).as_posix().encode())
            h.update(f.read_bytes())
        _CODE_DIGEST = h.hexdigest()
    return _CODE_DIGEST


def resolve_config(config) -> Dict[str, Any]:
    """The config as a plain dict with checkpoint paths made absolute (workers may run elsewhere)."""
    from ..core.config import load_config

    d = load_config(config).to_dict()
    for key in ("tracker", "refiner", "features"):
        ck = d[key].get("checkpoint")
        if ck:
            d[key]["checkpoint"] = str(Path(ck).expanduser().resolve())
    return d


def config_digest(cfg: Dict[str, Any]) -> str:
    return _sha256_bytes(json.dumps(cfg, sort_keys=True, default=str).encode())


def checkpoint_files(cfg: Dict[str, Any]) -> List[str]:
    return [cfg[k]["checkpoint"] for k in ("tracker", "refiner", "features") if cfg[k].get("checkpoint")]


def read_manifest(path: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def output_files(bag: Path) -> Dict[str, int]:
    return {f.relative_to(bag).as_posix(): f.stat().st_size for f in sorted(bag.rglob("*")) if f.is_file()}


def is_complete(job: Job) -> Optional[Dict[str, Any]]:
    """The manifest when the job's output exists, is whole and was made from the same things."""
    out = Path(job.out_bag)
    m = read_manifest(Path(job.manifest))
    if m is None or m.get("key") != job.key or not out.is_dir():
        return None
    try:
        return m if output_files(out) == m.get("outputs") else None
    except OSError:
        return None


def _write_json_atomic(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)



def plan(inputs: Sequence[str], out: Path, image_topic: Optional[str], prompts_dir: Optional[str],
         prompt_topic: Optional[str], cfg: Dict[str, Any], options: Dict[str, Any]) -> List[Job]:
    jobs = []
    common = {"format": MANIFEST_FORMAT, "config_sha256": config_digest(cfg), "code": code_digest(),
              "options": {**options, "prompt_topic": prompt_topic}}
    try:
        common["checkpoints"] = [_file_stat(Path(p)) for p in checkpoint_files(cfg)]
    except OSError as exc:
        raise FleetError(f"checkpoint not readable: {exc.filename}: {exc.strerror}")
    for k, (path, name) in enumerate(find_bags(inputs, out)):
        job = Job(k, name, str(path), str(out / name), str(out / WORK_DIR / name), str(out / (name + MANIFEST_SUFFIX)),
                  prompt_topic=prompt_topic)
        job.image_topic, job.frames, job.error = _inspect(path, image_topic)
        if prompts_dir is not None:
            pf = Path(prompts_dir) / (name + ".prompts.yaml")
            if pf.is_file():
                job.prompts_file = str(pf.resolve())
            elif job.error is None:
                job.error = f"{path}: no prompts file {pf} (--prompts-dir looks for <bag name>.prompts.yaml)"
        try:
            files = input_files(path)
        except OSError as exc:
            files, job.error = [], job.error or f"{path}: {exc.strerror or exc}"
        job.key = {**common, "input": files, "image_topic": job.image_topic,
                   "prompts_sha256": prompts_digest(Path(job.prompts_file) if job.prompts_file else None)}
        jobs.append(job)
    return jobs
