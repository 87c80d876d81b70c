"""Crash-safe checkpoints: write into a temporary folder, then rename it into place.

A rename within one file system is atomic, so a reader (or a resumed run) sees either the
old checkpoint or the complete new one, never a half-written folder. Replacing an existing
folder takes two renames (``target`` → ``target.old``, ``target.tmp`` → ``target``); a crash
between them leaves only ``target.old``, which :func:`recover_checkpoints` moves back.
Folders with a suffix (``.tmp``, ``.old``, ``.del``) are never read as checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

_TMP_SUFFIX = ".tmp"
_DONE_MARK = "COMPLETE"
_DEL_SUFFIX = ".del"


def atomic_directory_write(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``target`` (replacing it)."""
    tmp = _fresh_tmp(target)
    write(tmp)
    return _commit(tmp, Path(target))


def sharded_directory_write(target: str | Path, write: Callable[[Path], None],
                            accelerator) -> Path:
    """:func:`atomic_directory_write` where every process writes its shard into the same
    temporary folder (``write(tmp)`` is called on all of them, e.g. a sharded
    ``save_state``); the main process alone prepares the folder and renames it into place,
    after everyone has finished writing. Collective: call it on every process."""
    target = Path(target)
    tmp = target.with_name(target.name + _TMP_SUFFIX)
    if accelerator.is_main_process:
        _fresh_tmp(target)
    accelerator.wait_for_everyone()
    write(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _commit(tmp, target)
    accelerator.wait_for_everyone()
    return target


def _fresh_tmp(target: str | Path) -> Path:
    target = Path(target)
    tmp = target.with_name(target.name + _TMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from a crash mid-write
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, target: Path) -> Path:
    (tmp / _DONE_MARK).write_text("ok\n")
    _fsync_tree(tmp)
    old = target.with_name(target.name + ".old")
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)  # the renames themselves survive a power cut
    if old.exists():
        shutil.rmtree(old)
    return target


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover_checkpoints(stage_dir: str | Path) -> None:
    """Tidy what a crash mid-write can leave in ``stage_dir``; safe to call at any start.

    A complete ``X.old`` whose ``X`` is missing (a crash between the two renames of
    :func:`atomic_directory_write`) is renamed back to ``X``; other ``.old`` folders and
    every ``.tmp`` / ``.del`` folder (unfinished writes and deletions) are removed.
    """
    stage_dir = Path(stage_dir)
    if not stage_dir.exists():
        return
    for path in sorted(stage_dir.glob("checkpoint-*.old")):
        base = path.with_name(path.name[: -len(".old")])
        if not base.exists() and is_complete(path):
            os.replace(path, base)
        else:
            shutil.rmtree(path, ignore_errors=True)
    for suffix in (_TMP_SUFFIX, _DEL_SUFFIX):
        for path in stage_dir.glob(f"checkpoint-*{suffix}"):
            shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(stage_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (``keep_last <= 0``: keep
    all). Each is first renamed to ``.del`` (atomic), so a crash mid-deletion never leaves a
    partial folder under a checkpoint name."""
    if keep_last <= 0:
        return
    for _, path in sorted(_complete_checkpoints(Path(stage_dir)))[:-keep_last]:
        doomed = path.with_name(path.name + _DEL_SUFFIX)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / _DONE_MARK).exists()


def latest_checkpoint(stage_dir: str | Path) -> Path | None:
    """The newest complete ``checkpoint-<step>`` folder of a stage, if any."""
    found = _complete_checkpoints(Path(stage_dir))
    return max(found)[1] if found else None


def _complete_checkpoints(stage_dir: Path) -> list[tuple[int, Path]]:
    if not stage_dir.exists():
        return []
    found = []
    for path in stage_dir.glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit() and is_complete(path):
            found.append((int(suffix), path))
    return found


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
