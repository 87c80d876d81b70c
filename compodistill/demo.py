"""`compodistill demo`: a whole CompoDistill run on a tiny model pair, on the CPU.

1. synthetic compositional data (coloured shapes in spatial relations, hard negatives);
2. a word-level tokenizer and tiny random LLaVA-style teacher and student built from
   configs, saved to disk and loaded back with ``from_pretrained``;
3. the teacher is trained briefly (LM loss) so it has something to distil, and the student
   gets a shorter warm-up (standing in for its pretrained LLM);
4. DPT → DFT → SFT on the student with TAF, fused logit KD and visual-attention distillation;
5. compositional-reasoning and VQA evaluation of teacher and student, and a summary.

Every number printed is measured in this run; nothing is precomputed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

DEFAULTS = dict(num_images=300, image_size=32, teacher_steps=600, student_warmup_steps=150,
                dpt_steps=30, dft_steps=120, sft_steps=60, batch_size=8, seed=0)


def _save_pair(out: Path, tokenizer, **sizes):
    from .hf.llava import tiny_llava_pair

    student, teacher = tiny_llava_pair(vocab_size=len(tokenizer), seed=sizes.pop("seed"), **sizes)
    paths = {}
    for name, model in (("student", student), ("teacher", teacher)):
        paths[name] = out / "models" / f"{name}-init"
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def _stage_config(kind: str, steps: int, batch_size: int, **extra) -> dict:
    return dict(kind=kind, max_steps=steps, batch_size=batch_size, lr=extra.pop("lr", 2e-3),
                warmup_ratio=0.03, **extra)


def _evaluate(model, encoder, data: dict, progress: bool) -> dict:
    from .eval import evaluate_cr, evaluate_vqa, load_synthetic_cr, load_vqa_json

    cr = evaluate_cr(model, load_synthetic_cr(data["cr_eval"], data["image_folder"]), encoder,
                     scorers=("loglik",), progress=progress)["loglik"]
    vqa = evaluate_vqa(model, load_vqa_json(data["vqa_eval"], data["image_folder"]), encoder,
                       progress=progress)
    return {"cr": cr.accuracy, "cr_per_category": cr.per_category, "vqa": vqa.accuracy}


def run_demo(out: str | Path = "runs/demo", *, progress: bool = True, **overrides) -> dict:
    """Run the whole demo into ``out``; returns the summary it prints."""
    from .data import ConversationEncoder, build_tiny_tokenizer, generate_synthetic
    from .hf.llava import load_student
    from .train.config import config_from_dict
    from .train.trainer import DistillationTrainer

    opts = {**DEFAULTS, **overrides}
    out = Path(out)
    start = time.perf_counter()
    torch.manual_seed(opts["seed"])
    generate_synthetic(str(out / "data"), num=opts["num_images"],
                       image_size=opts["image_size"], seed=opts["seed"], progress=progress)
    data = {name: str(out / "data" / f"{name}.json") for name in ("train", "cr_eval", "vqa_eval")}
    data["image_folder"] = str(out / "data")
    records = json.loads(Path(data["train"]).read_text())
    texts = [turn["value"] for rec in records for turn in rec["conversations"]]
    tokenizer = build_tiny_tokenizer(texts=texts)
    paths = _save_pair(out, tokenizer, image_size=opts["image_size"], patch_size=8,
                       teacher_hidden=64, teacher_layers=6, student_hidden=32, student_layers=4,
                       seed=opts["seed"])
    bs = opts["batch_size"]
    common = dict(data=dict(train_json=data["train"], image_folder=data["image_folder"],
                            max_length=256), seed=opts["seed"], log_every=5)

    # 3. the teacher, trained on the LM loss alone (no teacher of its own); the student gets a
    #    shorter warm-up the same way, standing in for the pretrained small LLM that real
    #    CompoDistill starts from (LoRA on a random network would learn next to nothing).
    for name, steps in (("teacher", opts["teacher_steps"]),
                        ("student", opts["student_warmup_steps"])):
        warmup_cfg = config_from_dict({**common, "student": str(paths[name]), "taf": False,
                                       "output_dir": str(out / f"{name}-warmup"), "stages": [
            _stage_config("sft", steps, bs, name=name, trainable="all", lr=3e-3)]})
        DistillationTrainer(warmup_cfg, show_progress=progress).run()
        paths[name] = out / f"{name}-warmup" / f"1-{name}" / "model"
    teacher_path = paths["teacher"]

    # 4. the student: DPT -> DFT -> SFT with TAF, KD and VAT (SPEC §7, shortened).
    student_cfg = config_from_dict({**common, "student": str(paths["student"]),
                                    "teacher": str(teacher_path),
                                    "output_dir": str(out / "student"), "stages": [
        _stage_config("dpt", opts["dpt_steps"], bs),
        _stage_config("dft", opts["dft_steps"], bs, lora_r=16, lora_alpha=32, lr=3e-3),
        _stage_config("sft", opts["sft_steps"], bs, lora_r=16, lora_alpha=32, lr=3e-3)]})
    trainer = DistillationTrainer(student_cfg, show_progress=progress)
    results = trainer.run()
    train_seconds = time.perf_counter() - start

    # 5. evaluation, every model loaded back from disk.
    scores = {}
    for name, path in (("teacher", teacher_path), ("student (warm-up only)", paths["student"]),
                       ("student (CompoDistill)", out / "student" / "3-sft" / "model")):
        model = load_student(str(path)).eval()
        cfg = model.config
        encoder = ConversationEncoder(tokenizer, cfg.vision_config.image_size,
                                      num_image_tokens=cfg.image_seq_length,
                                      image_token_id=cfg.image_token_id)
        scores[name] = _evaluate(model, encoder, data, progress)
    summary = {
        "stages": [{"stage": r.name, "steps": r.steps, "skipped": r.skipped_steps,
                    "seconds": round(r.seconds, 1), **{k: round(v, 4)
                                                        for k, v in r.final_losses.items()}}
                   for r in results],
        "scores": scores, "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1), "output_dir": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict) -> str:
    lines = ["", "stage     steps  seconds  final losses"]
    for s in summary["stages"]:
        losses = ", ".join(f"{k}={v}" for k, v in s.items() if k.startswith("loss"))
        lines.append(f"{s['stage']:<9}{s['steps']:>6}{s['seconds']:>9}  {losses}")
    lines += ["", f"{'model':<26}{'CR (A/B, both orders)':>22}{'VQA exact match':>17}"]
    for name, sc in summary["scores"].items():
        lines.append(f"{name:<26}{100 * sc['cr']:>21.1f}%{100 * sc['vqa']:>16.1f}%")
    lines += ["", f"trained in {summary['train_seconds']} s, total {summary['total_seconds']} s; "
                  f"everything is in {summary['output_dir']} (summary.json, metrics, loss curves)"]
    return "\n".join(lines)
