"""Reading a teacher cache: memory-mapped shards, one sample at a time.

:class:`TeacherCache` opens ``DIR``, checks its manifest against the run (stale caches are
refused), and returns each sample's tensors from its shard through ``safetensors.safe_open``
(a memory map: only the tensors asked for are read). A truncated or damaged shard, a
missing shard record or a sample the cache does not hold is a :class:`TeacherCacheError`
naming the file and the sample.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from .format import REWRITE, TeacherCacheError, read_json, sample_fields, shard_name, shard_problem
from .manifest import check_manifest

__all__ = ["TeacherCache"]

RERUN = "rerun compodistill teacher-cache to rewrite it"


class TeacherCache:
    """A finished cache directory, read lazily.

    Args:
        root: the cache directory.
        open_files: how many shards stay memory-mapped at once.
    """

    def __init__(self, root: str | Path, *, open_files: int = 64):
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise TeacherCacheError(f"teacher.cache: {self.root} is not a teacher cache (no "
                                    f"manifest.json); write it with `compodistill teacher-cache "
                                    f"--config FILE`")
        self.manifest_path = manifest_path
        self.manifest = read_json(manifest_path, "manifest")
        index_path = self.root / "index.json"
        if not index_path.is_file():
            raise TeacherCacheError(f"teacher cache {self.root} is incomplete: no index.json "
                                    f"(the cache run did not finish); rerun compodistill "
                                    f"teacher-cache to resume it")
        self.index = read_json(index_path, "index")
        self.num_samples = int(self.index["num_samples"])
        self.per_shard = int(self.manifest["shard_samples"])
        self.num_maps = len(self.manifest["vat"]["matches"])
        self._open: OrderedDict[int, object] = OrderedDict()
        self.open_files = open_files
        self.verified = ""  # "sha256" or "size" once verify() passed

    # ------------------------------------------------------------------ checks
    def check(self, config, student_config, teacher_path: str = "",
              image_processor=None) -> "TeacherCache":
        """Refuse a stale cache (:func:`~compodistill.teacher_cache.manifest.check_manifest`)."""
        check_manifest(self.manifest, config, student_config, self.manifest_path,
                       teacher_path=teacher_path, image_processor=image_processor)
        return self

    def bad_shards(self, full: bool = True) -> list[str]:
        """One line per shard that does not match its record in index.json (sha256 with
        ``full``, else the size); empty for a sound cache."""
        out = []
        for record in self.index["shards"]:
            problem = shard_problem(self.root, record, full)
            if problem is not None:
                last = record["first"] + record["count"] - 1
                out.append(f"teacher cache shard {problem} (samples {record['first']}–{last})")
        return out

    def verify(self, full: bool = True) -> "TeacherCache":
        """Raise :class:`TeacherCacheError` at the first shard that does not match its record
        (``teacher.verify``: ``full`` hashes every shard, ``size`` compares sizes)."""
        bad = self.bad_shards(full)
        if bad:
            more = f" ({len(bad)} bad shards in all)" if len(bad) > 1 else ""
            raise TeacherCacheError(f"{bad[0]}{more}; no step was trained; {REWRITE}")
        self.verified = "sha256" if full else "size"
        return self

    @property
    def has_kd(self) -> bool:
        return bool(self.manifest["kd"]["stored"])

    @property
    def has_maps(self) -> bool:
        return bool(self.manifest["vat"]["stored"])

    # ------------------------------------------------------------------ shards
    def _shard(self, shard: int, sample: int):
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        from safetensors import safe_open

        records = self.index["shards"]
        path = self.root / f"{shard_name(shard)}.safetensors"
        if shard >= len(records):
            raise TeacherCacheError(f"sample {sample} is missing from teacher cache {self.root}: "
                                    f"index.json lists {len(records)} shards "
                                    f"({self.num_samples} samples); the data set has more "
                                    f"samples than were cached; {RERUN}")
        record = records[shard]
        if not path.is_file():
            raise TeacherCacheError(f"teacher cache shard {path} (samples {record['first']}–"
                                    f"{record['first'] + record['count'] - 1}) is missing; "
                                    f"sample {sample} cannot be read; {RERUN}")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise TeacherCacheError(f"teacher cache shard {path} is truncated or damaged: "
                                    f"{size} bytes, index.json says {record['bytes']}; sample "
                                    f"{sample} cannot be read; {RERUN}")
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error type
            raise TeacherCacheError(f"teacher cache shard {path} cannot be opened ({e}); "
                                    f"sample {sample} cannot be read; {RERUN}") from None
        self._open[shard] = handle
        if len(self._open) > self.open_files:
            self._open.popitem(last=False)
        return handle

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        """Sample ``i``'s tensors, by field name (``shape``, ``kd_logp``, ``map0``, ...)."""
        i = int(i)
        if not 0 <= i < self.num_samples:
            raise TeacherCacheError(f"sample {i} is missing from teacher cache {self.root}: it "
                                    f"holds samples 0–{self.num_samples - 1} (index.json); "
                                    f"{RERUN}")
        shard = i // self.per_shard
        handle = self._shard(shard, i)
        path = self.root / f"{shard_name(shard)}.safetensors"
        names = sample_fields(i, self.has_kd, self.manifest["vat"]["maps"]
                              if self.has_maps else None, self.num_maps)
        available = set(handle.keys())
        missing = [n for n in names if n not in available]
        if missing:
            raise TeacherCacheError(f"sample {i} is missing from teacher cache shard {path} "
                                    f"(no tensor {missing[0]!r}); {RERUN}")
        try:
            return {n.split(".", 1)[1]: handle.get_tensor(n) for n in names}
        except Exception as e:
            raise TeacherCacheError(f"teacher cache shard {path} is damaged ({e}); sample {i} "
                                    f"cannot be read; {RERUN}") from None
