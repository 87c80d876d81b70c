"""Helper for test_fsdp.py (not a test module): DPT → DFT → SFT on saved tiny models, in one
process or under ``accelerate launch`` (FSDP2, DDP, DeepSpeed).

Usage: python tests/fsdp_run.py ROOT OUT [GRAD_ACCUM [RECIPE]]

Each process writes ``OUT/report-rank<r>.json``: per stage it ran, the step it resumed from,
the weighted loss of every micro-batch it computed, the local and full shapes of every
sharded parameter of the student and of the teacher (and all parameter names), and how many
all-gathers included each model's ``lm_head`` weight. ``FSDP_TEST_KILL=STAGE:CALL`` SIGKILLs
process 0 at that loss call of that stage (a crash mid-run); ``FSDP_TEST_STAGES=dpt,dft``
runs only those stages; ``FSDP_TEST_MAX_GRAD_NORM`` sets every stage's ``max_grad_norm``.
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
from compodistill.train.distributed import is_deepspeed, is_fsdp2, local_shard_shapes  # noqa: E402
from compodistill.train.stages import lm_head  # noqa: E402
from compodistill.train.trainer import CompoDistillTrainer  # noqa: E402

STEPS = {"dpt": 2, "dft": 4, "sft": 2}


def main(root: Path, out: str, grad_accum: str = "1", recipe: str = "compodistill") -> None:
    # Batches of 4: two micro-batches of 2, one per process or accumulated in one process.
    kinds = os.environ.get("FSDP_TEST_STAGES", ",".join(STEPS)).split(",")
    stages = [{"kind": kind, "max_steps": STEPS[kind], "batch_size": 4,
               "grad_accum": int(grad_accum), "lr": 1e-2, "lora_r": 4, "lora_alpha": 8,
               "lora_dropout": 0.0,
               "max_grad_norm": float(os.environ.get("FSDP_TEST_MAX_GRAD_NORM", "1.0"))}
              for kind in kinds]
    config = config_from_dict({
        "recipe": recipe, "student": str(root / "student"), "teacher": str(root / "teacher"),
        "output_dir": out, "save_every": 2, "cpu_threads": 1,
        "data": {"train_json": str(root / "data" / "train.json"),
                 "image_folder": str(root / "data"), "max_length": 128},
        "vat": {"student_layers": [1, 2], "teacher_layers": [2, 3]},
        "stages": stages})
    trainer = CompoDistillTrainer(config, show_progress=False)
    report, gathered = {}, []
    kill = os.environ.get("FSDP_TEST_KILL", "")

    if is_fsdp2(trainer.acc):
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group

        gather = group.foreach_all_gather

        def counted(fsdp_params, *args, **kwargs):
            gathered.append({id(p.sharded_param) for p in fsdp_params})
            return gather(fsdp_params, *args, **kwargs)

        group.foreach_all_gather = counted

    if is_deepspeed(trainer.acc):  # every ZeRO-3 gather, by the parameters it gathers
        import deepspeed

        gathered_init = deepspeed.zero.GatheredParameters.__init__

        def counted_init(self, params, *args, **kwargs):
            gathered.append({id(p) for p in (params if isinstance(params, (list, tuple))
                                             else [params])})
            gathered_init(self, params, *args, **kwargs)

        deepspeed.zero.GatheredParameters.__init__ = counted_init

    run = engine.StageLoop.run

    def traced_run(loop, resume=True):
        name, calls, seen = loop.stage.name, {"n": 0}, []
        losses, start = loop.loss_terms, {}
        resume_from = loop._resume

        def traced_resume():
            start["step"], skipped = resume_from()
            return start["step"], skipped

        def loss_terms(prepared, batch):
            calls["n"] += 1
            if kill == f"{name}:{calls['n']}" and trainer.acc.is_main_process:
                os.kill(os.getpid(), signal.SIGKILL)
            terms = losses(prepared, batch)
            seen.append(float(loop._weighted(terms).detach()))
            return terms

        loop.loss_terms, loop._resume = loss_terms, traced_resume
        heads = {"student": lm_head(loop.acc.unwrap_model(loop.model).model).weight}
        if trainer.teacher is not None:
            heads["teacher"] = lm_head(trainer.teacher).weight
        gathered.clear()
        result = run(loop, resume)
        report[name] = {
            "student": local_shard_shapes(loop.model),
            "zero_partitions": zero_partitions(loop.model),
            "student_params": [n for n, _ in loop.model.named_parameters()],
            "teacher": local_shard_shapes(trainer.teacher) if trainer.teacher else {},
            "teacher_params": [n for n, _ in trainer.teacher.named_parameters()],
            "start_step": start["step"], "losses": seen,
            # what the DeepSpeed engine clips to and accumulates over (None: not DeepSpeed)
            "engine_clip_accum": ([loop.model.gradient_clipping(),
                                   loop.model.gradient_accumulation_steps()]
                                  if is_deepspeed(loop.acc) else None),
            "lm_head_gathers": {who: sum(id(w) in ids for ids in gathered)
                                for who, w in heads.items()}}
        # Written after every stage: a run killed later still leaves its earlier stages.
        path = Path(out) / f"report-rank{trainer.acc.process_index}.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**old, **report}, indent=1))
        return result

    engine.StageLoop.run = traced_run
    trainer.run()


def zero_partitions(model) -> dict:
    """``{name: (local numel, full numel)}`` of every ZeRO-3 partitioned parameter."""
    return {name: (p.ds_tensor.numel(), p.ds_numel) for name, p in model.named_parameters()
            if hasattr(p, "ds_numel")}


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], *sys.argv[3:])
