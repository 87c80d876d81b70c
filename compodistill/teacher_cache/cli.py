"""``compodistill teacher-cache --config FILE [--stage NAME ...]`` and
``compodistill teacher-cache --verify DIR`` (docs/teacher_cache.md)."""
from __future__ import annotations

import argparse

HELP = "run the teacher once and write its KD and visual-attention targets to a cache"
DESCRIPTION = """\
Run the teacher once over the training data of the stages that need it (a kd or vat
weight) and write its targets to the directory `teacher: {cache: DIR}` names: top-k
log-probabilities + ids + rest mass at the KD positions, and the window-mean visual maps
of every matched student layer (exact, or top-k per query row with `maps: topk`).
Training with the same config then never loads the teacher. Any family `compodistill
train` supports: the teacher gets the family's own inputs (e.g. Qwen's image grid).

Config (the `teacher:` mapping):
  teacher:
    path: runs/demo/teacher-warmup/1-teacher/model   # the teacher to run
    cache: runs/teacher-cache                        # where the cache goes
    topk: 64              # logit entries per KD position (<= vocabulary)
    dtype: bf16           # bf16 | fp32 for log-probabilities and maps
    maps: exact           # exact | topk
    map_topk: 32          # columns per query row with maps: topk
    shard_samples: 64     # samples per shard (unit of resuming and of the rank split)
    batch_size: 8         # teacher batch size
    shard: auto           # auto | fsdp | none: shard the teacher over the processes

Several processes: `accelerate launch --config_file configs/accelerate/ddp.yaml
-m compodistill.cli teacher-cache --config FILE`; each process writes its own shards,
and the files are the same as one process writes. With an FSDP2 config
(configs/accelerate/fsdp.yaml) the teacher's weights are sharded over the processes too
(`shard: auto`; `fsdp` insists, `none` keeps it whole), and the files are again the
same. A run killed mid-way resumes: finished shards are kept, a half-written or damaged one
is redone.

`--verify DIR` checks every shard of a finished cache against the sha256 in its record
and lists the bad ones (exit status 1 when any is bad).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="YAML or JSON config with "
                      "`teacher: {path: TEACHER, cache: DIR}`")
    what.add_argument("--verify", metavar="DIR", help="check every shard of the cache in DIR "
                      "against its sha256 and list the bad ones")
    parser.add_argument("--stage", nargs="*", default=None, dest="stages",
                        help="only the needs of these stages, by name (default: every stage "
                             "with a kd or vat weight)")


def verify(root: str) -> int:
    """Print every bad shard of ``root``; 0 when all match their sha256, else 1."""
    import sys

    from .format import REWRITE
    from .reader import TeacherCache

    cache = TeacherCache(root)  # no manifest or index: a TeacherCacheError, one line
    bad = cache.bad_shards(full=True)
    total = len(cache.index["shards"])
    if not bad:
        print(f"teacher cache {root}: all {total} shards match their sha256")
        return 0
    for line in bad:
        print(line)
    print(f"compodistill teacher-cache: {len(bad)} of {total} shards of {root} are bad; {REWRITE}",
          file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    if args.verify:
        return verify(args.verify)
    from ..data import records_skipped_line
    from ..train.config import load_config
    from .format import read_json
    from .writer import write_teacher_cache

    config = load_config(args.config)
    root = write_teacher_cache(config, stages=args.stages, show_progress=not args.quiet)
    index = read_json(root / "index.json", "index")
    print(records_skipped_line(index.get("records_skipped", {}), index.get("first_skipped", [])))
    print(f"teacher cache written to {root} (manifest.json, index.json, shard-*.safetensors); "
          f"train from it with `compodistill train --config {args.config}`")
    return 0
