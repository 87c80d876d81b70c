"""Helper for test_teacher_cache.py: write the teacher cache of a tiny pair, one process or
several (under `accelerate launch`).

Usage: python tests/teacher_cache_run.py ROOT CACHE_DIR
"""
import sys
from pathlib import Path

from compodistill.teacher_cache.writer import write_teacher_cache
from compodistill.train.config import config_from_dict

root, cache = Path(sys.argv[1]), sys.argv[2]
config = config_from_dict({
    "student": str(root / "student"), "output_dir": str(root / "unused"), "cpu_threads": 1,
    "teacher": {"path": str(root / "teacher"), "cache": cache, "topk": 100000,
                "dtype": "fp32", "shard_samples": 4, "batch_size": 2},
    "data": {"train_json": str(root / "data" / "train.json"), "image_folder": str(root / "data"),
             "max_length": 128},
    "vat": {"student_layers": [1, 2], "teacher_layers": [1, 2, 3]},
    "stages": [{"kind": "dpt", "max_steps": 2, "batch_size": 2},
               {"kind": "dft", "max_steps": 2, "batch_size": 2, "lora_r": 4, "lora_alpha": 8}]})
write_teacher_cache(config, show_progress=False)
