"""Crash-safe checkpoints: write into a temporary folder, then rename it into place.

A rename within one file system is atomic, so a reader (or a resumed run) sees either the
old checkpoint or the complete new one, never a half-written folder.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

_TMP_SUFFIX = ".tmp"
_DONE_MARK = "COMPLETE"


def atomic_directory_write(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``target`` (replacing it)."""
    target = Path(target)
    tmp = target.with_name(target.name + _TMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from a crash mid-write
    tmp.mkdir(parents=True)
    write(tmp)
    (tmp / _DONE_MARK).write_text("ok\n")
    _fsync_tree(tmp)
    old = target.with_name(target.name + ".old")
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)
    return target


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / _DONE_MARK).exists()


def latest_checkpoint(stage_dir: str | Path) -> Path | None:
    """The newest complete ``checkpoint-<step>`` folder of a stage, if any."""
    stage_dir = Path(stage_dir)
    if not stage_dir.exists():
        return None
    found = []
    for path in stage_dir.glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit() and is_complete(path):
            found.append((int(suffix), path))
    return max(found)[1] if found else None


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
