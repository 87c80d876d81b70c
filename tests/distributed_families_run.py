"""Helper for test_distributed_families.py (not a test module): the DFT stage (KD, VAT, TAF),
or the chain DPT (LM + KD) -> DFT (LM + KD + VAT) -> SFT (LM), on a saved tiny family pair,
with TAF, in one process or under ``accelerate launch`` (FSDP2 or DDP).

Usage: python tests/distributed_families_run.py ROOT OUT GRAD_ACCUM STEPS [VAT_QUERY [STAGES]]

``STAGES``: comma-separated stage kinds (default ``dft``), each run for ``STEPS`` steps.

``FAMILY_TEST_KILL=CALL`` checkpoints every 2 steps and SIGKILLs process 0 at that loss
call of each stage (a crash mid-run); relaunching with ``FAMILY_TEST_KILL=`` (empty) resumes
it. By hand only.

Each process writes ``OUT/report-rank<r>.json``: the number of processes and, per stage, the
weighted loss of every micro-batch it computed, the names of the final loss terms, the local
and full shapes of every sharded (DTensor) student and teacher parameter with all parameter
names, the classes of their FSDP groups, and how many all-gathers included each model's
``lm_head`` weight.
"""
import json
import os
import signal
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.modules["torch.utils.tensorboard"] = None  # optional and slow to import: skip it

from compodistill.train import engine  # noqa: E402
from compodistill.train.config import config_from_dict  # noqa: E402
from compodistill.train.distributed import is_fsdp2, local_shard_shapes  # noqa: E402
from compodistill.train.stages import lm_head  # noqa: E402
from compodistill.train.trainer import CompoDistillTrainer  # noqa: E402

MAX_GRAD_NORM = 100.0


def main(root: Path, out: str, grad_accum: str, steps: str, query: str = "all",
         stages: str = "dft") -> None:
    # Batches of 4: two micro-batches of 2, one per process or accumulated in one process.
    config = config_from_dict({
        "student": str(root / "student"), "teacher": str(root / "teacher"),
        "output_dir": out, "taf": True, "cpu_threads": 1,
        "save_every": 2 if "FAMILY_TEST_KILL" in os.environ else 0,
        "data": {"train_json": str(root / "data" / "train.json"),
                 "image_folder": str(root / "data"), "max_length": 256},
        "vat": {"student_layers": [0, 1], "teacher_layers": [1, 2, 3], "query": query},
        # Each kind's default trainable and loss terms (DPT: post-connector, LM + KD; DFT:
        # LoRA + post-connector, LM + KD + VAT; SFT: a fresh LoRA, LM).
        "stages": [{"kind": kind, "max_steps": int(steps), "batch_size": 4,
                    "grad_accum": int(grad_accum), "lr": 1e-2, "lora_r": 4, "lora_alpha": 8,
                    "lora_dropout": 0.0,
                    # clipping must not act for a bitwise comparison (test docstring); Gemma
                    # 3's tiny pair has gradient norms of 2-3
                    "max_grad_norm": MAX_GRAD_NORM} for kind in stages.split(",")]})
    trainer = CompoDistillTrainer(config, show_progress=False)
    run, gathered = engine.StageLoop.run, []
    report = {"processes": trainer.acc.num_processes}

    if is_fsdp2(trainer.acc):  # count the all-gathers, as tests/fsdp_run.py does
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group

        gather = group.foreach_all_gather

        def counted(fsdp_params, *args, **kwargs):
            gathered.append({id(p.sharded_param) for p in fsdp_params})
            return gather(fsdp_params, *args, **kwargs)

        group.foreach_all_gather = counted

    def traced_run(loop, resume=True):
        losses, seen = loop.loss_terms, []

        def loss_terms(prepared, batch):
            if os.environ.get("FAMILY_TEST_KILL") == str(len(seen) + 1) and \
                    trainer.acc.is_main_process:
                os.kill(os.getpid(), signal.SIGKILL)
            terms = losses(prepared, batch)
            seen.append(float(loop._weighted(terms).detach()))
            return terms

        loop.loss_terms = loss_terms
        heads = {"student": lm_head(loop.acc.unwrap_model(loop.model).model).weight,
                 "teacher": lm_head(trainer.teacher).weight}
        gathered.clear()
        result = run(loop, resume)
        report[loop.stage.name] = dict(
            losses=seen, terms=sorted(result.final_losses),
            student=local_shard_shapes(loop.model),
            student_params=[n for n, _ in loop.model.named_parameters()],
            teacher=local_shard_shapes(trainer.teacher),
            teacher_params=[n for n, _ in trainer.teacher.named_parameters()],
            groups={who: sorted({type(m).__name__ for m in model.modules()
                                 if type(m).__name__.startswith("FSDP")})
                    for who, model in (("student", loop.model), ("teacher", trainer.teacher))},
            lm_head_gathers={who: sum(id(w) in ids for ids in gathered)
                             for who, w in heads.items()})
        return result

    engine.StageLoop.run = traced_run
    trainer.run()
    path = Path(out) / f"report-rank{trainer.acc.process_index}.json"
    path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
