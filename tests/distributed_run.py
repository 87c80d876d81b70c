"""Helper for test_distributed.py: one DPT stage on saved tiny models, single or multi-process.

Usage: python tests/distributed_run.py ROOT OUT [GRAD_ACCUM]  (or under `accelerate launch`).
"""
import sys
from pathlib import Path

from compodistill.train.config import config_from_dict
from compodistill.train.trainer import CompoDistillTrainer

root, out = Path(sys.argv[1]), sys.argv[2]
grad_accum = int(sys.argv[3]) if len(sys.argv) > 3 else 1
config = config_from_dict({
    "student": str(root / "student"), "teacher": str(root / "teacher"), "output_dir": out,
    "data": {"train_json": str(root / "data" / "train.json"), "image_folder": str(root / "data"),
             "max_length": 128},
    "stages": [{"kind": "dpt", "max_steps": 3, "batch_size": 4, "lr": 1e-2,
                "grad_accum": grad_accum}]})
trainer = CompoDistillTrainer(config, show_progress=False)
trainer.run()
trainer.acc.print(f"world size {trainer.acc.num_processes}")
