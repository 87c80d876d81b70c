"""CoMD competitive distillation loop (docs/stages.md), ``config.recipe: comd``.

Each round k (``config.comd.rounds``, default 4) under ``<output_dir>/round-<k>/``:

1. **tune**: the student runs ``config.stages`` (instruction tuning; LM, optionally KD) on the
   round's instruction set (``instructions.json``; round 1: ``config.data.train_json``);
2. **assess**: teacher and student answer each instruction greedily (``answers.json``, at most
   ``comd.assess_samples`` of them); the judge scores both answers in both orders
   (``scores.json``); a sample is hard when mean teacher − mean student score ≥
   ``comd.threshold`` (``hard.json``);
3. **augment**: the teacher writes a new instruction like each hard one (same images) and
   answers it (``augmented.json``, LLaVA-format records, encoded for training like the
   input data: with the family's image inputs, each image its own token count);
4. **tune-augmented**: the student runs ``config.stages`` on the augmented records.

The next round's instructions are this round's plus the augmented ones (``comd.accumulate``;
else the augmented only). Every file is written atomically and reused when present, training
steps resume like any stage, and ``round-<k>/done.json`` marks a finished round, so a run
restarted at any point continues where it stopped. The final student is saved to
``<output_dir>/model``. Generation is greedy and runs the same on every process; the main
process writes the files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Callable

from ...data.llava import MalformedRecordError, parse_record, read_records
from ...hf.families import visual_token_ids
from ..checkpoint import is_complete
from .comd_judges import (GreedyGenerator, JudgeRequest, ModelJudge, ReferenceOverlapJudge,
                          strip_image_tags)
from .facts import COMD as FACTS
from .compodistill import CompoDistillRecipe

__all__ = ["CoMDRecipe", "DEFAULT_AUGMENT_PROMPT", "ROUND_FILES"]

DEFAULT_AUGMENT_PROMPT = (
    "Here is an instruction about the image:\n{instruction}\n\n"
    "Write one new instruction about the same image that tests the same skill and is as hard. "
    "Reply with the new instruction only.")
ROUND_FILES = ("instructions.json", "answers.json", "scores.json", "hard.json", "augmented.json")


def _write_json(path: Path, data) -> None:
    """Write JSON to a temporary file and rename it into place (all or nothing)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


class CoMDRecipe(CompoDistillRecipe):
    """The CoMD loop; tuning steps use the :class:`StageLosses` terms (``lm``, ``kd``).

    Args:
        judge: a :class:`~.comd_judges.Judge`; default from ``config.comd.judge`` ("model": a
            :class:`ModelJudge` on ``comd.judge_model`` or the teacher; "overlap":
            :class:`ReferenceOverlapJudge`).
        generator_factory: ``(model, max_new_tokens) -> Generator`` used for the teacher's and
            student's answers, the teacher's new instructions and the judge model; default
            :class:`GreedyGenerator`.
    """

    name = "comd"
    facts = FACTS

    def __init__(self, judge=None, generator_factory: Callable | None = None):
        self.judge, self.generator_factory = judge, generator_factory

    # ------------------------------------------------------------------ plumbing
    def generator(self, trainer, model, max_new_tokens: int, image_inputs=None):
        """A generator for ``model``; ``image_inputs``: its family's (data/family_inputs.py),
        default the trainer's, which serve the student and the teacher (one family, checked
        when the trainer starts). None for a LLaVA model: a fixed count per image."""
        if self.generator_factory is not None:
            return self.generator_factory(model, max_new_tokens)
        from ...data import ConversationEncoder
        from ...hf.families import family_of

        cfg = model.config
        if image_inputs is None and family_of(cfg).name != "llava":
            image_inputs = trainer.image_inputs
        if image_inputs is None:
            encoder = ConversationEncoder(trainer.tokenizer, cfg.vision_config.image_size,
                                          num_image_tokens=cfg.image_seq_length,
                                          image_token_id=cfg.image_token_id)
        else:  # each image's token block comes from image_inputs
            encoder = ConversationEncoder(trainer.tokenizer, 1, num_image_tokens=1,
                                          image_token_id=visual_token_ids(cfg)[0])
        return GreedyGenerator(model, encoder, trainer.tokenizer, max_new_tokens=max_new_tokens,
                               batch_size=trainer.config.comd.generation_batch_size,
                               image_inputs=image_inputs)

    def resolve_judge(self, trainer):
        """The judge of this run: the one given to the constructor, else ``config.comd.judge``
        (a :class:`ModelJudge` on ``comd.judge_model``, of any trainer family, or the teacher)."""
        if self.judge is not None:
            return self.judge
        opts = trainer.config.comd
        if opts.judge == "overlap":
            return ReferenceOverlapJudge()
        model, image_inputs = trainer.teacher, None
        if opts.judge_model:
            from ...data.family_inputs import family_image_inputs
            from ...hf.loading import load_family_model

            model = load_family_model(opts.judge_model).eval().to(trainer.acc.device)
            image_inputs = family_image_inputs(model.config, opts.judge_model,
                                               trainer.tokenizer)  # InternVL's markers
        if model is None:
            raise ValueError("comd.judge 'model' needs a teacher or comd.judge_model")
        self.judge = ModelJudge(self.generator(trainer, model, opts.judge_max_new_tokens,
                                                image_inputs), opts.judge_prompt)
        return self.judge

    def _save(self, trainer, path: Path, data) -> None:
        if trainer.acc.is_main_process:
            _write_json(path, data)
        trainer.acc.wait_for_everyone()

    def _cached(self, trainer, path: Path, build: Callable[[], list]) -> list:
        """The contents of ``path`` when a previous run wrote it, else ``build()`` saved there."""
        if path.exists():
            return json.loads(path.read_text())
        data = build()
        self._save(trainer, path, data)
        return data

    def _tune(self, trainer, records: list, folder: Path) -> tuple[list, Path | None]:
        """Run ``config.stages`` on ``records`` into ``folder``; returns results, model path."""
        from ..trainer import CompoDistillTrainer

        dataset = trainer.load_dataset(records)
        if len(dataset) == 0:
            trainer.acc.print(f"comd: nothing to train on in {folder}, step skipped")
            return [], None
        config = dataclasses.replace(trainer.config, output_dir=str(folder))
        sub = CompoDistillTrainer(config, student=trainer.student, teacher=trainer.teacher,
                                  tokenizer=trainer.tokenizer, train_dataset=dataset,
                                  accelerator=trainer.acc, show_progress=trainer.show_progress,
                                  recipe=self)
        results = sub.run_chain()
        trainer.student = sub.student
        return results, sub.stage_dir(config.stages[-1]) / "model"

    # ------------------------------------------------------------------ the round's steps
    def _instructions(self, trainer, k: int, out: Path) -> list:
        if k == 1:
            records, _ = read_records(trainer.config.data.train_json)
            return [rec for rec, _ in records]
        prev = out / f"round-{k - 1}"
        previous = json.loads((prev / "instructions.json").read_text())
        augmented = json.loads((prev / "augmented.json").read_text())
        if not trainer.config.comd.accumulate and augmented:
            return augmented
        return previous + augmented

    def _assessed(self, trainer, records: list, k: int) -> list[dict]:
        """Instruction, reference, images of the (sampled) records; malformed ones skipped."""
        items = []
        folder = trainer.config.data.image_folder or None
        for i, rec in enumerate(records):
            try:
                messages, paths = parse_record(rec, f"record {i}", folder)
            except MalformedRecordError:
                continue
            user = next((j for j, m in enumerate(messages) if m["role"] == "user"), None)
            if user is None or user + 1 >= len(messages):
                continue
            items.append({"id": rec.get("id", i), "instruction": messages[user]["content"],
                          "reference": messages[user + 1]["content"], "images": paths,
                          "image": rec.get("image")})
        cap = trainer.config.comd.assess_samples
        if cap is not None and len(items) > cap:
            rng = random.Random(f"{trainer.config.seed}-comd-{k}")
            items = [items[i] for i in sorted(rng.sample(range(len(items)), cap))]
        return items

    def _answer(self, trainer, items: list[dict]) -> list[dict]:
        prompts, images = [it["instruction"] for it in items], [it["images"] for it in items]
        tokens = trainer.config.comd.max_new_tokens
        teacher = self.generator(trainer, trainer.teacher, tokens)(prompts, images)
        student = self.generator(trainer, trainer.student, tokens)(prompts, images)
        return [{**it, "teacher": t, "student": s} for it, t, s in zip(items, teacher, student)]

    def _score(self, trainer, answers: list[dict]) -> list[dict]:
        judge = self.resolve_judge(trainer)

        def requests(first: str, second: str):
            return [JudgeRequest(a["instruction"], a[first], a[second], a["reference"],
                                 a["images"]) for a in answers]

        # Both orders, so a judge's preference for the first (or second) slot cancels out.
        forward = judge(requests("teacher", "student"))
        backward = judge(requests("student", "teacher"))
        scores = []
        for a, f, b in zip(answers, forward, backward):
            t_scores = [f[0] if f else None, b[1] if b else None]
            s_scores = [f[1] if f else None, b[0] if b else None]
            t, s = _mean(t_scores), _mean(s_scores)
            gap = None if t is None or s is None else t - s
            scores.append({"id": a["id"], "teacher_scores": t_scores, "student_scores": s_scores,
                           "teacher": t, "student": s, "gap": gap,
                           "hard": gap is not None and gap >= trainer.config.comd.threshold})
        return scores

    def _augment(self, trainer, hard: list[dict], k: int) -> list[dict]:
        if not hard:
            return []
        opts = trainer.config.comd
        template = opts.augment_prompt or DEFAULT_AUGMENT_PROMPT
        prompts = [template.format(instruction=strip_image_tags(h["instruction"]),
                                   reference=h["reference"]) for h in hard]
        images = [h["images"] for h in hard]
        writer = self.generator(trainer, trainer.teacher, opts.instruction_max_new_tokens)
        new = [strip_image_tags(text) for text in writer(prompts, images)]
        keep = [i for i, text in enumerate(new)
                if text and text != strip_image_tags(hard[i]["instruction"])]
        answerer = self.generator(trainer, trainer.teacher, opts.max_new_tokens)
        answers = answerer([new[i] for i in keep], [images[i] for i in keep])
        records = []
        for i, answer in zip(keep, answers):
            answer = strip_image_tags(answer)  # a stray tag would not match the images
            if not answer:
                continue  # nothing to supervise
            tags = "<image>\n" * len(hard[i]["images"])
            record = {"id": f"comd-r{k}-{len(records)}", "source_id": hard[i]["id"],
                      "conversations": [{"from": "human", "value": tags + new[i]},
                                        {"from": "gpt", "value": answer}]}
            if hard[i].get("image"):
                record["image"] = hard[i]["image"]
            records.append(record)
        return records

    # ------------------------------------------------------------------ the loop
    def _round(self, trainer, k: int, out: Path) -> list:
        folder = out / f"round-{k}"
        folder.mkdir(parents=True, exist_ok=True)
        instructions = self._cached(trainer, folder / "instructions.json",
                                    lambda: self._instructions(trainer, k, out))
        results, model = self._tune(trainer, instructions, folder / "tune")
        answers = self._cached(trainer, folder / "answers.json", lambda: self._answer(
            trainer, self._assessed(trainer, instructions, k)))
        scores = self._cached(trainer, folder / "scores.json",
                              lambda: self._score(trainer, answers))
        hard = self._cached(trainer, folder / "hard.json", lambda: [
            {**a, "gap": s["gap"]} for a, s in zip(answers, scores) if s["hard"]])
        augmented = self._cached(trainer, folder / "augmented.json",
                                 lambda: self._augment(trainer, hard, k))
        more, augmented_model = self._tune(trainer, augmented, folder / "tune-augmented")
        model = augmented_model or model
        self._save(trainer, folder / "done.json", {
            "round": k, "model": None if model is None else str(model),
            "instructions": len(instructions), "assessed": len(answers), "hard": len(hard),
            "augmented": len(augmented)})
        return results + more

    def run(self, trainer, stages: list[str] | None) -> list:
        """All rounds; finished ones (``done.json``) are skipped. Returns the stage results."""
        if stages is not None:
            raise ValueError("recipe 'comd' runs whole rounds; selecting stages does not apply")
        if trainer.teacher is None:
            raise ValueError("recipe 'comd' needs a teacher (config.teacher)")
        from ..distributed import is_sharded

        if is_sharded(trainer.acc):  # its rounds generate with both models: not sharded yet
            raise ValueError("recipe 'comd' does not run under FSDP or DeepSpeed; launch it "
                             "with DDP (configs/accelerate/ddp.yaml) or on one process")
        out = trainer.output_dir
        out.mkdir(parents=True, exist_ok=True)
        if trainer.acc.is_main_process:
            from ..config import config_to_dict

            _write_json(out / "config.json", config_to_dict(trainer.config))
        results, resume_from, ran = [], None, False
        for k in range(1, trainer.config.comd.rounds + 1):
            done = out / f"round-{k}" / "done.json"
            if done.exists():
                resume_from = json.loads(done.read_text())["model"] or resume_from
                continue
            if resume_from is not None:  # the student as the last finished round left it
                trainer.student = trainer.reload(resume_from)
                resume_from = None
            results += self._round(trainer, k, out)
            ran = True
        final = out / "model"
        if ran or not is_complete(final):  # e.g. more rounds asked for than the last run had
            if resume_from is not None:
                trainer.student = trainer.reload(resume_from)
            trainer.save_model(trainer.student, final)
        return results
