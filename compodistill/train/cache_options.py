"""The ``teacher: {cache: DIR, ...}`` section of a run's config (docs/teacher_cache.md).

``teacher: PATH`` keeps its meaning (the teacher runs online). A mapping switches the
stages that need the teacher to the cache in ``cache``; ``path`` names the teacher that
``compodistill teacher-cache`` runs to write it (training never loads it; when given, its
hash is checked against the cache's manifest). The other keys shape what the cache run
writes; training reads them from the cache's manifest instead.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config_fields import ConfigError, check_fields, choice

CACHE_DTYPES = ("bf16", "fp32")
MAP_STORAGE = ("exact", "topk")
# How training checks each shard before its data first trains: its sha256 against the shard's
# record (full: reads every shard once per process) or only its size.
VERIFY = ("full", "size")
# Whether the cache run shards the teacher's weights over its processes (docs/teacher_cache.md):
# auto: under an FSDP2 accelerate config with several processes; fsdp: always (refused
# where it cannot run); none: every process holds the whole teacher.
SHARD = ("auto", "fsdp", "none")
# Default k of the logit top-k (docs/teacher_cache.md#choosing-k). On the demo pair every k
# of bench/results/teacher_cache.csv from 8 up is within bf16 rounding of online KD, but its
# vocabulary has 345 ids and its teacher is very peaked; 64 keeps a margin for real
# vocabularies at 392 bytes per KD position.
DEFAULT_TOPK = 64


@dataclass
class TeacherCacheOptions:
    """Where the cache lives and what it holds.

    Attributes:
        cache: the cache directory (one subfolder per stage that needs the teacher).
        path: the teacher checkpoint the cache run loads ("" in a training-only config).
        topk: logit entries kept per KD position (at most the vocabulary; the rest of the
            probability mass is kept as one number).
        dtype: ``bf16`` or ``fp32`` for the stored log-probabilities and maps.
        maps: ``exact`` (every visual column of every query row) or ``topk`` (``map_topk``
            columns per row plus the rest of the row's mass).
        map_topk: columns kept per query row when ``maps: topk``.
        shard_samples: samples per shard (the unit of resuming and of the per-rank split).
        batch_size: teacher batch size inside a shard.
        verify: how training checks each shard before its data first trains: ``full``
            (its sha256 against its record; reads each shard once per process) or ``size``
            (the file size only, for caches too large to hash at every start).
        shard: how the cache run holds the teacher: ``auto`` (sharded with FSDP2 when
            launched with an FSDP2 accelerate config and several processes, else whole on
            every process), ``fsdp`` (always sharded; refused with one process or another
            engine) or ``none`` (whole on every process). Not part of the targets: a cache
            is byte-identical either way.
    """

    cache: str = ""
    path: str = ""
    topk: int = DEFAULT_TOPK
    dtype: str = choice("bf16", CACHE_DTYPES)
    maps: str = choice("exact", MAP_STORAGE)
    map_topk: int = 32
    shard_samples: int = 64
    batch_size: int = 8
    verify: str = choice("full", VERIFY)
    shard: str = choice("auto", SHARD)

    def __post_init__(self):
        check_fields(self)
        if not self.cache:
            raise ConfigError("cache", "is required: the cache directory")
        for key in ("topk", "map_topk", "shard_samples", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")

    @classmethod
    def from_dict(cls, raw: dict) -> "TeacherCacheOptions":
        import dataclasses

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError("teacher", f"unknown keys {unknown}; expected some of "
                                         f"{sorted(known)}")
        try:
            return cls(**raw)
        except ConfigError as e:
            raise e.within("teacher") from None


# What a config needs so that every teacher-dependent term can come from the cache.
def check_cacheable(config) -> None:
    """Raise :class:`ConfigError` when ``config`` asks for targets the cache cannot hold."""
    if config.recipe != "compodistill":
        raise ConfigError("teacher.cache", f"the teacher cache serves the compodistill recipe "
                                           f"(KD and VAT); recipe {config.recipe!r} needs the "
                                           f"teacher online")
    if config.vat.matching == "adaptive" and any(s.weights.vat for s in config.stages):
        raise ConfigError("teacher.cache", "vat.matching 'adaptive' picks a teacher layer per "
                                           "step from the student's maps; use 'group' or "
                                           "'simple' with a cache")
    if config.vat.query == "response" and any(s.weights.vat for s in config.stages):
        raise ConfigError("vat.query", "'response' rows come from each batch's labels and the "
                                       "cache does not store maps for them yet; use 'all', "
                                       "'visual' or 'text' with a cache, or the teacher online")
