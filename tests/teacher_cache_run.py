"""Helper for test_teacher_cache.py: write the teacher cache of a tiny pair, one process or
several (under `accelerate launch`).

Usage: python tests/teacher_cache_run.py ROOT CACHE_DIR [OPTIONS_JSON [REPORT_DIR]]

``OPTIONS_JSON``: keys that replace those of the ``teacher:`` mapping below (e.g.
``{"shard": "fsdp", "shard_samples": 2}``). ``REPORT_DIR``: each process writes
``report-rank<r>.json`` there: under ``cache``, the local and full shapes of every sharded
(DTensor) teacher parameter, all parameter names, and the teacher forwards it ran (real and
dummy; 0 and 0 with a whole teacher), in the layout ``bench/fsdp_memory.py --check`` reads.
"""
import json
import sys
from pathlib import Path

from compodistill.teacher_cache import sharded, writer
from compodistill.train.config import config_from_dict

root, cache = Path(sys.argv[1]), sys.argv[2]
options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
config = config_from_dict({
    "student": str(root / "student"), "output_dir": str(root / "unused"), "cpu_threads": 1,
    "teacher": {"path": str(root / "teacher"), "cache": cache, "topk": 100000,
                "dtype": "fp32", "shard_samples": 4, "batch_size": 2, **options},
    "data": {"train_json": str(root / "data" / "train.json"), "image_folder": str(root / "data"),
             "max_length": 128},
    "vat": {"student_layers": [1, 2], "teacher_layers": [1, 2, 3]},
    "stages": [{"kind": "dpt", "max_steps": 2, "batch_size": 2},
               {"kind": "dft", "max_steps": 2, "batch_size": 2, "lora_r": 4, "lora_alpha": 8}]})
seen = {}
shard, lockstep = writer.shard_cache_teacher, sharded.Lockstep


def traced_shard(teacher, accelerator):
    seen.update(teacher=teacher, acc=accelerator)
    return shard(teacher, accelerator)


class TracedLockstep(lockstep):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        seen["lockstep"] = self


writer.shard_cache_teacher, sharded.Lockstep = traced_shard, TracedLockstep
writer.write_teacher_cache(config, show_progress=False)
if len(sys.argv) > 4:
    from compodistill.train.distributed import local_shard_shapes

    teacher, step = seen.get("teacher"), seen.get("lockstep")
    rank = seen["acc"].process_index if "acc" in seen else 0
    report = {"cache": {
        "teacher": local_shard_shapes(teacher) if teacher is not None else {},
        "teacher_params": [n for n, _ in teacher.named_parameters()] if teacher else [],
        "forwards": step.forwards if step else 0, "dummies": step.dummies if step else 0}}
    out = Path(sys.argv[4])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"report-rank{rank}.json").write_text(json.dumps(report, indent=1))
