"""Hidden staging folders for outputs that appear only when complete, and their clean-up.

`hqsmem track` and `hqsmem bag` write into a hidden folder beside (or in) the output and move
the result in at the end. A run that is killed cannot remove its folder, so the folder's name
carries the writer's process id and the next run of the same command removes every folder of
that kind whose writer is gone (folders of a run still going are left alone).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import List


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(parent: Path, prefix: str) -> List[Path]:
    """Remove `parent/<prefix><pid>-*` folders whose process is gone (and `<prefix>*` folders
    without a pid, from versions that did not name one). Returns the removed folders."""
    removed = []
    pattern = re.compile(re.escape(prefix) + r"(?:(\d+)-)?")
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(m.group(1)) if m.group(1) else None
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
    return removed


def make_staging(parent: Path, prefix: str) -> Path:
    """A fresh hidden folder `parent/<prefix><pid>-XXXX`, after removing stale ones (OSError as
    mkdtemp raises it)."""
    remove_stale(parent, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
