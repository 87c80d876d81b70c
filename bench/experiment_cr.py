"""Does visual-attention distillation help? A small CPU experiment on the synthetic CR data.

Not run in CI (a smoke version is: ``tests/test_experiment_cr.py``). One invocation:

1. generates the synthetic compositional data (coloured shapes in spatial relations), with
   extra CR-format records per image (``--cr-extra``) so the A/B question is a larger share of
   the training mix;
2. trains a tiny LLaVA-style teacher from scratch (every weight, vision tower included, LM loss);
3. per seed, builds a random student language model, gives it the teacher's trained vision
   tower (teacher and student share the vision encoder, as in the paper) and warms it up on the
   *text* of the training data only (standing in for a pretrained small LLM: it never sees an
   image before distillation);
4. trains every variant from that warm student with the same DPT → DFT → SFT budget: SFT only
   (LM loss), + logit KD, + KD + VAT, + KD + VAT + TAF (CompoDistill), and the paper's
   ablations on top of CompoDistill: layer matching (group / simple / adaptive), layer range
   (early / intermediate / late / all) and VAT loss (cosine / KL / MSE);
5. evaluates the teacher and every student: CR asked as A/B in both orders (docs/evaluation.md, scored by
   the A/B letter log-likelihoods) and CR by caption log-likelihood (positive vs negative
   caption; a more sensitive diagnostic), both per category, and VQA exact match; and measures
   how much attention mass each model's text tokens put on the image tokens per layer;
6. writes one CSV row per run (with hardware, date, versions, git commit and the command),
   a bar plot with mean ± std over seeds, and prints a markdown table.

    python bench/experiment_cr.py                    # the full default run (< 60 min, 1 thread)
    python bench/experiment_cr.py --quick            # smoke version, about 2 minutes
    python bench/experiment_cr.py --variants sft kd+vat+taf --seeds 0 1

Finished runs are kept under ``--out`` (``runs/<variant>/seed<k>/result.json``) and reused when
the command is started again, so an interrupted experiment resumes.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import RESULTS_DIR, provenance  # noqa: E402

# ----------------------------------------------------------------------------- variants

# name -> (taf, kd weight, vat weight, VAT options). The ablations change one VAT option of
# CompoDistill (KD + VAT + TAF; group matching, intermediate layers, cosine loss).
BASE_VAT = dict(matching="group", preset="intermediate", loss="cosine")
VARIANTS: dict[str, dict] = {
    "sft": dict(taf=False, kd=0.0, vat=0.0, group="method"),
    "kd": dict(taf=False, kd=1.0, vat=0.0, group="method"),
    "kd+vat": dict(taf=False, kd=1.0, vat=1.0, group="method"),
    "kd+vat+taf": dict(taf=True, kd=1.0, vat=1.0, group="method"),
    "match=simple": dict(taf=True, kd=1.0, vat=1.0, group="matching", matching="simple"),
    "match=adaptive": dict(taf=True, kd=1.0, vat=1.0, group="matching", matching="adaptive"),
    "layers=early": dict(taf=True, kd=1.0, vat=1.0, group="layers", preset="early"),
    "layers=late": dict(taf=True, kd=1.0, vat=1.0, group="layers", preset="late"),
    "layers=all": dict(taf=True, kd=1.0, vat=1.0, group="layers", preset="all"),
    "loss=kl": dict(taf=True, kd=1.0, vat=1.0, group="loss", loss="kl"),
    "loss=mse": dict(taf=True, kd=1.0, vat=1.0, group="loss", loss="mse"),
    # The other seed methods (docs/stages.md) as recipes of the same trainer, same step budget.
    "recipe=llava_kd": dict(taf=False, kd=1.0, vat=0.0, group="recipe", recipe="llava_kd"),
    "recipe=llavadi": dict(taf=False, kd=1.0, vat=0.0, group="recipe", recipe="llavadi"),
}


def vat_options(variant: str) -> dict:
    spec = VARIANTS[variant]
    return {k: spec.get(k, v) for k, v in BASE_VAT.items()}


# Defaults of the full run (sized to finish in < 60 min on 2 CPU cores with 1 thread) and of
# --quick (about 2 minutes).
FULL = dict(num_images=3000, num_eval=100, cr_extra=1, teacher_hidden=64, teacher_layers=6,
            student_hidden=32, student_layers=3, patch_size=8, teacher_steps=2500,
            teacher_lr=3e-3, teacher_batch=16, warmup_steps=300, dpt_steps=100, dft_steps=300,
            sft_steps=100, batch_size=16, student_lr=3e-3, lora_r=32,
            seeds=[0, 1, 2], variants=list(VARIANTS), attention_items=24)
QUICK = dict(FULL, num_images=120, num_eval=10, teacher_steps=60,
             warmup_steps=20, dpt_steps=6, dft_steps=12, sft_steps=6, batch_size=8,
             teacher_batch=8, seeds=[0], variants=["sft", "kd", "kd+vat", "kd+vat+taf"],
             attention_items=4)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke version (~2 min)")
    p.add_argument("--out", default=None, help="work folder (default runs/experiment_cr[_quick])")
    p.add_argument("--csv", default=None, help="result CSV (default bench/results/"
                   "experiment_cr.csv; --quick: <out>/experiment_cr.csv)")
    p.add_argument("--plot", default=None, help="bar plot PNG (default next to the CSV)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--progress", action="store_true", help="tqdm bars")
    for key, value in FULL.items():
        if key in ("seeds", "variants"):
            continue
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None,
                       help=f"default {value} (--quick: {QUICK[key]})")
    return p


def resolve(args: argparse.Namespace) -> dict:
    """The settings of this invocation: the defaults (full or quick) with the flags on top."""
    base = QUICK if args.quick else FULL
    opts = {k: (getattr(args, k) if getattr(args, k, None) is not None else v)
            for k, v in base.items()}
    opts["quick"] = args.quick
    out = Path(args.out or ("runs/experiment_cr_quick" if args.quick else "runs/experiment_cr"))
    opts["out"] = out
    opts["csv"] = Path(args.csv) if args.csv else (
        out / "experiment_cr.csv" if args.quick else RESULTS_DIR / "experiment_cr.csv")
    opts["plot"] = Path(args.plot) if args.plot else opts["csv"].with_suffix(".png")
    opts["threads"], opts["progress"] = args.threads, args.progress
    return opts


# ----------------------------------------------------------------------------- data

_CAPTION = re.compile(r"^a (\w+) (\w+) (left of|right of|above|below) a (\w+) (\w+)$")


def make_data(folder: Path, opts: dict) -> dict:
    """Synthetic data plus ``cr_extra`` more CR records per training image.

    Writes ``train.json`` (images + text), ``train_text.json`` (the same conversations
    without images: the student's language warm-up) and the generator's eval files.
    """
    from compodistill.data import generate_synthetic
    from compodistill.data.synthetic import CATEGORIES, Scene, hard_negative
    from compodistill.data.prompts import cr_prompt

    if not (folder / "meta.json").exists():
        generate_synthetic(str(folder / "synth"), num=opts["num_images"],
                           num_eval=opts["num_eval"], image_size=32, seed=1234,
                           progress=opts["progress"])
        records = json.loads((folder / "synth" / "train.json").read_text())
        rng = random.Random(1234)
        extra = []
        for rec in records:
            if not rec["id"].endswith("_0"):  # record 0 of each image is its caption
                continue
            caption = rec["conversations"][1]["value"]
            scene = Scene(*_CAPTION.match(caption).groups())
            for k in range(opts["cr_extra"]):
                negative = hard_negative(scene, CATEGORIES[k % len(CATEGORIES)], rng)
                first = rng.random() < 0.5
                a, b = (caption, negative) if first else (negative, caption)
                extra.append({"id": f"{rec['id']}_cr{k}", "image": rec["image"],
                              "conversations": [
                                  {"from": "human", "value": "<image>\n" + cr_prompt(a, b)},
                                  {"from": "gpt", "value": "A" if first else "B"}]})
        train = records + extra
        text_only = [{"id": r["id"], "conversations": [
            {"from": t["from"], "value": t["value"].replace("<image>\n", "")}
            for t in r["conversations"]]} for r in train]
        (folder / "synth" / "train_mix.json").write_text(json.dumps(train))
        (folder / "synth" / "train_text.json").write_text(json.dumps(text_only))
        cr_records = sum(r["conversations"][-1]["value"] in ("A", "B") for r in train)
        (folder / "meta.json").write_text(json.dumps({"train_records": len(train),
                                                      "cr_records": cr_records}))
    synth = folder / "synth"
    return {"train": str(synth / "train_mix.json"), "text": str(synth / "train_text.json"),
            "cr_eval": str(synth / "cr_eval.json"), "vqa_eval": str(synth / "vqa_eval.json"),
            "image_folder": str(synth)}


def tokenizer_for(data: dict):
    from compodistill.data import build_tiny_tokenizer

    records = json.loads(Path(data["train"]).read_text())
    return build_tiny_tokenizer(texts=[t["value"] for r in records for t in r["conversations"]])


# ----------------------------------------------------------------------------- training


def _train(cfg: dict, progress: bool):
    from compodistill.train.config import config_from_dict
    from compodistill.train.trainer import CompoDistillTrainer

    return CompoDistillTrainer(config_from_dict(cfg), show_progress=progress).run()


def _common(data_json: str, data: dict, seed: int) -> dict:
    return dict(data=dict(train_json=data_json, image_folder=data["image_folder"],
                          max_length=256), seed=seed, log_every=10)


def train_teacher(work: Path, data: dict, tokenizer, opts: dict) -> tuple[Path, float]:
    """A tiny teacher from scratch, every weight trained on the LM loss; returns its folder."""
    from compodistill.hf.llava import tiny_llava_pair

    final = work / "teacher" / "1-teacher" / "model"
    if (final / "config.json").exists():
        return final, json.loads((work / "teacher" / "seconds.json").read_text())["seconds"]
    start = time.perf_counter()
    _, teacher = tiny_llava_pair(vocab_size=len(tokenizer), image_size=32,
                                 patch_size=opts["patch_size"],
                                 teacher_hidden=opts["teacher_hidden"],
                                 teacher_layers=opts["teacher_layers"], seed=0)
    init = work / "models" / "teacher-init"
    teacher.save_pretrained(init)
    tokenizer.save_pretrained(init)
    _train({**_common(data["train"], data, 0), "student": str(init), "taf": False,
            "output_dir": str(work / "teacher"), "stages": [
                dict(kind="sft", name="teacher", trainable="all", lr=opts["teacher_lr"],
                     max_steps=opts["teacher_steps"], batch_size=opts["teacher_batch"],
                     warmup_ratio=0.05)]}, opts["progress"])
    seconds = time.perf_counter() - start
    (work / "teacher" / "seconds.json").write_text(json.dumps({"seconds": seconds}))
    return final, seconds


def warm_student(work: Path, data: dict, tokenizer, teacher_path: Path, seed: int,
                 opts: dict) -> Path:
    """A random student LM with the teacher's vision tower, warmed up on text only."""
    from compodistill.hf.llava import load_student, tiny_llava_pair

    final = work / f"student-warmup-seed{seed}" / "1-warmup" / "model"
    if (final / "config.json").exists():
        return final
    student, _ = tiny_llava_pair(vocab_size=len(tokenizer), image_size=32,
                                 patch_size=opts["patch_size"], teacher_hidden=8,
                                 teacher_layers=1, student_hidden=opts["student_hidden"],
                                 student_layers=opts["student_layers"], seed=1000 + seed)
    teacher = load_student(str(teacher_path))
    student.model.vision_tower.load_state_dict(teacher.model.vision_tower.state_dict())
    init = work / "models" / f"student-init-seed{seed}"
    student.save_pretrained(init)
    tokenizer.save_pretrained(init)
    # Text only: no image ever reaches the vision tower, so it stays the teacher's.
    _train({**_common(data["text"], data, seed), "student": str(init), "taf": False,
            "output_dir": str(work / f"student-warmup-seed{seed}"), "stages": [
                dict(kind="sft", name="warmup", trainable="all", lr=opts["student_lr"],
                     max_steps=opts["warmup_steps"], batch_size=opts["batch_size"])]},
           opts["progress"])
    return final


def student_config(variant: str, seed: int, student: Path, teacher: Path, data: dict,
                   out: Path, opts: dict) -> dict:
    """The DPT → DFT → SFT chain of one variant (same steps, batch and lr for all)."""
    spec = VARIANTS[variant]
    taf, kd, vat = spec["taf"], spec["kd"], spec["vat"]
    bs, lr = opts["batch_size"], opts["student_lr"]
    lora = dict(lora_r=opts["lora_r"], lora_alpha=2 * opts["lora_r"], lora_dropout=0.0)
    if "recipe" in spec:
        return recipe_config(spec["recipe"], seed, student, teacher, data, out, opts, lora)
    return {**_common(data["train"], data, seed), "student": str(student),
            "teacher": str(teacher) if (kd or vat or taf) else "", "taf": taf,
            "output_dir": str(out), "vat": vat_options(variant), "stages": [
                dict(kind="dpt", trainable="post_connector" if taf else "connector", lr=lr,
                     max_steps=opts["dpt_steps"], batch_size=bs,
                     weights=dict(lm=1.0, kd=kd, vat=0.0)),
                dict(kind="dft", trainable="lora+post_connector" if taf else "lora", lr=lr,
                     max_steps=opts["dft_steps"], batch_size=bs,
                     weights=dict(lm=1.0, kd=kd, vat=vat), **lora),
                dict(kind="sft", trainable="lora", lr=lr, max_steps=opts["sft_steps"],
                     batch_size=bs, weights=dict(lm=1.0, kd=0.0, vat=0.0), **lora)]}


def recipe_config(recipe: str, seed: int, student: Path, teacher: Path, data: dict, out: Path,
                  opts: dict, lora: dict) -> dict:
    """LLaVA-KD (DPT → SFT → DFT) or LLAVADI (DPT → DFT) with the CompoDistill step budget."""
    bs, lr = opts["batch_size"], opts["student_lr"]
    step = dict(lr=lr, batch_size=bs)
    if recipe == "llava_kd":
        all_terms = dict(lm=1.0, kd=1.0, kd_vis=1.0, rdist=1.0)
        stages = [dict(kind="dpt", max_steps=opts["dpt_steps"], weights=all_terms, **step),
                  dict(kind="sft", max_steps=opts["sft_steps"], **step, **lora),
                  dict(kind="dft", max_steps=opts["dft_steps"], weights=all_terms, **step,
                       **lora)]
    else:
        stages = [dict(kind="dpt", max_steps=opts["dpt_steps"], **step),
                  dict(kind="dft", max_steps=opts["dft_steps"] + opts["sft_steps"],
                       weights=dict(lm=1.0, kd=1.0, feat=1.0), **step, **lora)]
    return {**_common(data["train"], data, seed), "recipe": recipe, "student": str(student),
            "teacher": str(teacher), "output_dir": str(out), "stages": stages}


# ----------------------------------------------------------------------------- evaluation


def _encoder(model, tokenizer):
    from compodistill.data import ConversationEncoder

    cfg = model.config
    return ConversationEncoder(tokenizer, cfg.vision_config.image_size,
                               num_image_tokens=cfg.image_seq_length,
                               image_token_id=cfg.image_token_id)


@torch.no_grad()
def image_attention(model, encoder, examples, items: int) -> list[float]:
    """Per layer: mean attention mass that text tokens after the image put on image tokens.

    Head mean, over every text query row after the image of ``items`` CR prompts (both
    orders); eager attention with ``output_attentions`` (the models are tiny). The last entry
    is the baseline: the share that attention spread evenly over the visible keys would give.
    """
    from compodistill.data.prompts import cr_prompt

    impl = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        per_layer, uniform = None, []
        for ex in list(examples)[:items]:
            for a, b in ((ex.positive, ex.negative), (ex.negative, ex.positive)):
                ids = encoder.prompt_ids(cr_prompt(a, b), 1)[None]
                pixels = encoder.pixels([ex.image])
                out = model(input_ids=ids, pixel_values=pixels, output_attentions=True)
                vis = ids[0] == model.config.image_token_id
                last = int(vis.nonzero().max())
                rows = torch.arange(last + 1, ids.shape[1])
                mass = [att[0].mean(0)[rows][:, vis].sum(-1).mean().item()
                        for att in out.attentions]
                per_layer = mass if per_layer is None else [x + y for x, y in zip(per_layer, mass)]
                uniform.append((vis.sum() / (rows + 1).float()).mean().item())
        n = 2 * min(items, len(examples))
        return [round(x / n, 4) for x in per_layer] + [round(sum(uniform) / n, 4)]
    finally:
        model.set_attn_implementation({"text_config": impl})


def evaluate(model_path: Path, tokenizer, data: dict, opts: dict) -> dict:
    from compodistill.eval import evaluate_cr, evaluate_vqa, load_synthetic_cr, load_vqa_json
    from compodistill.hf.llava import load_student

    model = load_student(str(model_path)).eval()
    encoder = _encoder(model, tokenizer)
    examples = load_synthetic_cr(data["cr_eval"], data["image_folder"])
    cr = evaluate_cr(model, examples, encoder, scorers=("loglik", "caption"),
                     progress=opts["progress"])
    vqa = evaluate_vqa(model, load_vqa_json(data["vqa_eval"], data["image_folder"]), encoder,
                       progress=opts["progress"])
    attention = image_attention(model, encoder, examples, opts["attention_items"])
    res = {"cr_ab": cr["loglik"].accuracy, "cr_caption": cr["caption"].accuracy,
           "vqa": vqa.accuracy, "image_attention": attention[:-1],
           "image_attention_uniform": attention[-1]}
    for scorer, key in (("loglik", "cr_ab"), ("caption", "cr_caption")):
        for cat, acc in cr[scorer].per_category.items():
            res[f"{key}_{cat}"] = acc
    for qtype, acc in vqa.per_type.items():
        res[f"vqa_{qtype}"] = acc
    return res


# ----------------------------------------------------------------------------- output

CSV_FIELDS = ["variant", "group", "seed", "cr_ab", "cr_caption", "cr_ab_attribute",
              "cr_ab_relation", "cr_ab_object", "cr_caption_attribute", "cr_caption_relation",
              "cr_caption_object", "vqa", "vqa_color", "vqa_shape", "vqa_relation",
              "vqa_position", "image_attention", "image_attention_uniform", "final_losses",
              "train_seconds", "wall_seconds", "device", "threads", "date", "torch",
              "transformers", "git_commit", "command"]


def write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (json.dumps(row[k]) if isinstance(row.get(k), (list, dict))
                                 else row.get(k, "")) for k in CSV_FIELDS})


def _mean_std(values: list[float]) -> tuple[float, float]:
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per variant, in table order (teacher first)."""
    order = ["teacher", "student (warm-up)"] + list(VARIANTS)
    out = []
    for name in order:
        group = [r for r in rows if r["variant"] == name]
        if not group:
            continue
        s = {"variant": name, "n": len(group)}
        for key in ("cr_ab", "cr_caption", "cr_caption_attribute", "cr_caption_relation",
                    "cr_caption_object", "vqa", "train_seconds"):
            s[key] = _mean_std([float(r[key]) for r in group])
        out.append(s)
    return out


def markdown_table(summary: list[dict]) -> str:
    pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"  # noqa: E731
    lines = ["| variant | seeds | CR A/B (both orders) | CR caption | caption: attribute "
             "| caption: relation | caption: object | VQA | train s/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['variant']} | {s['n']} | {pct(s['cr_ab'])} | {pct(s['cr_caption'])} "
                     f"| {pct(s['cr_caption_attribute'])} | {pct(s['cr_caption_relation'])} "
                     f"| {pct(s['cr_caption_object'])} | {pct(s['vqa'])} "
                     f"| {s['train_seconds'][0]:.0f} |")
    return "\n".join(lines)


def plot(summary: list[dict], png: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("cr_ab", "CR A/B (both orders)"), ("cr_caption", "CR caption log-likelihood"),
               ("vqa", "VQA exact match")]
    names = [s["variant"] for s in summary]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.6), sharey=False)
    for ax, (key, label) in zip(axes, metrics):
        means = [100 * s[key][0] for s in summary]
        stds = [100 * s[key][1] for s in summary]
        colors = ["0.4" if n in ("teacher", "student (warm-up)") else
                  f"C{['method', 'matching', 'layers', 'loss', 'recipe'].index(VARIANTS[n]['group'])}"
                  for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=colors)
        if key.startswith("cr"):
            ax.axhline(50, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(f"{label} (%)")
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ----------------------------------------------------------------------------- main


def write_outputs(rows: list[dict], opts: dict, prov: dict, start: float):
    """CSV, plot and table of the runs so far (rewritten after every run)."""
    write_csv(opts["csv"], rows)
    summary = summarise(rows)
    minutes = (time.perf_counter() - start) / 60
    title = (f"experiment_cr on {prov['device']}, {opts['threads']} thread(s), {minutes:.1f} min, "
             f"seeds {opts['seeds']}, mean ± std; commit {prov['git_commit']}")
    plot(summary, opts["plot"], title)
    return summary, markdown_table(summary)


def run(opts: dict, argv: list[str]) -> dict:
    torch.set_num_threads(opts["threads"])
    start = time.perf_counter()
    work: Path = opts["out"]
    work.mkdir(parents=True, exist_ok=True)
    prov = provenance(torch.device("cpu"))
    command = "python bench/experiment_cr.py " + " ".join(shlex.quote(a) for a in argv)
    base = {**prov, "threads": opts["threads"], "command": command.strip()}
    data = make_data(work / "data", opts)
    tokenizer = tokenizer_for(data)
    print(f"[experiment_cr] data ready in {time.perf_counter() - start:.0f} s", flush=True)

    teacher_path, teacher_seconds = train_teacher(work, data, tokenizer, opts)
    rows = [{**base, "variant": "teacher", "group": "reference", "seed": 0,
             "train_seconds": round(teacher_seconds, 1), "wall_seconds": round(teacher_seconds, 1),
             **evaluate(teacher_path, tokenizer, data, opts)}]
    t = rows[0]
    print(f"[experiment_cr] teacher: CR A/B {100 * t['cr_ab']:.1f}%, caption "
          f"{100 * t['cr_caption']:.1f}%, VQA {100 * t['vqa']:.1f}% "
          f"({teacher_seconds:.0f} s; {time.perf_counter() - start:.0f} s elapsed)", flush=True)

    write_outputs(rows, opts, prov, start)
    for seed in opts["seeds"]:
        warm = warm_student(work, data, tokenizer, teacher_path, seed, opts)
        for variant in opts["variants"]:
            run_dir = work / "runs" / variant / f"seed{seed}"
            done = run_dir / "result.json"
            if done.exists():
                rows.append(json.loads(done.read_text()))
                continue
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            config = student_config(variant, seed, warm, teacher_path, data, run_dir, opts)
            results = _train(config, opts["progress"])
            stages = config["stages"]  # the last stage's output is the final student
            final = run_dir / f"{len(stages)}-{stages[-1].get('name', stages[-1]['kind'])}"
            train_s = time.perf_counter() - t0
            row = {**base, "variant": variant, "group": VARIANTS[variant]["group"],
                   "seed": seed, "train_seconds": round(train_s, 1),
                   "final_losses": {r.name: {k: round(v, 4) for k, v in r.final_losses.items()}
                                    for r in results},
                   **evaluate(final / "model", tokenizer, data, opts)}
            row["wall_seconds"] = round(time.perf_counter() - t0, 1)
            done.write_text(json.dumps(row))
            rows.append(row)
            write_outputs(rows, opts, prov, start)
            print(f"[experiment_cr] seed {seed} {variant:<15} CR A/B {100 * row['cr_ab']:5.1f}%"
                  f"  caption {100 * row['cr_caption']:5.1f}%  VQA {100 * row['vqa']:5.1f}%"
                  f"  ({row['wall_seconds']:.0f} s; {time.perf_counter() - start:.0f} s elapsed)",
                  flush=True)

    total = time.perf_counter() - start
    summary, table = write_outputs(rows, opts, prov, start)
    att = "\n".join(f"- {r['variant']} (seed {r['seed']}): "
                    + ", ".join(f"{x:.2f}" for x in r["image_attention"])
                    + f" (uniform {r['image_attention_uniform']:.2f})"
                    for r in rows if r["variant"] in ("teacher", "sft", "kd+vat+taf")
                    and r["seed"] == opts["seeds"][0])
    print("\n" + table + "\n\nattention mass of text tokens on image tokens, per layer:\n" + att)
    print(f"\n{command}\ntotal {total:.0f} s on {prov['device']} ({opts['threads']} thread(s)); "
          f"wrote {opts['csv']} and {opts['plot']}", flush=True)
    return {"rows": rows, "summary": summary, "table": table, "seconds": total}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run(resolve(build_parser().parse_args(argv)), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
