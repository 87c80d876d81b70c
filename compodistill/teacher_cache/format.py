"""The on-disk layout of a teacher cache (docs/teacher_cache.md).

::

    DIR/manifest.json            what was cached, from what (hashes), with which options
    DIR/shard-00000.safetensors  samples [0, S): tensors named "<sample>.<field>"
    DIR/shard-00000.json         the shard's completion record (size, sha256, samples)
    ...
    DIR/index.json               every shard's record; written last, when all are complete

A shard is written to ``*.tmp`` and renamed, then its record is written the same way: a
shard without a record (a run killed mid-way) is never read and is redone on resume. The
files hold no time stamps and safetensors orders tensors by name, so the same inputs give
byte-identical files, whatever the number of processes.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

__all__ = ["FORMAT", "VERSION", "TeacherCacheError", "sha256_file", "hash_files",
           "shard_name", "write_atomic", "write_json_atomic", "read_json", "shard_record",
           "DTYPES", "sample_fields", "shard_problem", "REWRITE"]

# What to do about a damaged shard: the cache run redoes exactly the shards that fail this check.
REWRITE = ("rerun `compodistill teacher-cache --config FILE` with the config that wrote it: it "
           "rewrites only the bad shards")

FORMAT = "compodistill-teacher-cache"
VERSION = 2  # 2: the family, its image processor and visual token ids
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class TeacherCacheError(ValueError):
    """A cache that cannot serve this run: stale, incomplete, missing a sample or damaged.
    The message names the file and, where one is involved, the sample."""


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def hash_files(folder: str | Path, names: list[str] | None = None,
               suffixes: tuple[str, ...] = ()) -> str:
    """sha256 over the (name, sha256) of the files of ``folder`` that are listed in ``names``
    or end with one of ``suffixes`` (sorted by name; absent names are skipped)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and (
        (names and p.name in names) or p.name.endswith(suffixes)))
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` through ``path.tmp`` and a rename: never seen half-written."""
    tmp = path.with_name(path.name + ".tmp")
    _fsync_write(tmp, data)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise TeacherCacheError(f"{what} {path} cannot be read ({e}); rerun compodistill "
                                f"teacher-cache to rewrite it") from None


def shard_record(folder: Path, shard: int, first: int, count: int) -> dict:
    path = folder / f"{shard_name(shard)}.safetensors"
    return {"file": path.name, "first": first, "count": count,
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def sample_fields(i: int, kd: bool, maps: str | None, num_maps: int) -> list[str]:
    """The tensor names sample ``i`` has in its shard."""
    names = [f"{i}.shape"]
    if kd:
        names += [f"{i}.kd_pos", f"{i}.kd_logp", f"{i}.kd_idx", f"{i}.kd_rest"]
    for j in range(num_maps if maps else 0):
        names += ([f"{i}.map{j}"] if maps == "exact" else
                  [f"{i}.map{j}.val", f"{i}.map{j}.idx", f"{i}.map{j}.rest"])
    return names


def shard_problem(root: Path, record: dict, full: bool = True) -> str | None:
    """Why the shard of ``record`` does not match its record (None: it does).

    ``full``: also its sha256 (reads the whole file); else the size only. A mismatch here is
    damage to the file after it was written (disk, copy, edit), never a change in the data:
    the record was taken from the very bytes the cache run wrote.
    """
    path = Path(root) / record["file"]
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return (f"{path} is truncated or damaged: {size} bytes, its record says "
                f"{record['bytes']}")
    if full:
        found = sha256_file(path)
        if found != record["sha256"]:
            return (f"{path} is corrupted: sha256 {found}, its record says {record['sha256']} "
                    f"(same size: bytes changed on disk after the cache run wrote it)")
    return None
