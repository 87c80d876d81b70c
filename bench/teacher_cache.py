"""Benchmark: the offline teacher cache, size and error against online targets.

On the demo's trained tiny pair (``compodistill demo`` writes it; ``--demo DIR``) and the
first ``--samples`` records of its data, one cache is written per storage option, then:

- ``bytes_per_kd_token``: bytes of the logit targets (top-k log-probabilities, int32 ids,
  rest mass, position) per KD position, read from the shard tensors;
- ``bytes_per_sample``: bytes of the visual-attention targets (every matched layer) per sample;
- ``kd_rel_error`` / ``vat_rel_error``: |loss from the cache − online loss| / online loss of
  the DFT losses on the same batches (KD-only and VAT-only stage weights);
- ``kd_grad_cosine`` / ``vat_grad_cosine``: cosine between the gradients (every trainable
  weight: the TAF post-connector) from the cache and online;
- the cache size *computed* (not measured) for a LLaVA-665k-sized DFT stage
  (``llava665k_logits_gb``, ``llava665k_maps_gb``): 665,000 samples of 2,048 tokens,
  every token a KD position (an upper bound: KD uses the response tokens), 576 image tokens,
  all 2,048 query rows, 7 matched layers, from the byte formula of the format (the
  ``bytes_per_kd_token`` rows give the formula next to the measured bytes);
- ``step_ms`` / ``step_peak_mib`` / ``resident_mib``: one DFT student step (losses and
  backward) from the cache against online with the teacher resident: median time, the peak
  of tensor memory allocated inside the step, and the parameters held (student + teacher
  online, the student alone from the cache). Tiny models on the CPU.

Rows go to ``bench/results/teacher_cache.csv`` (``--plot``: a PNG).

Usage: ``python bench/teacher_cache.py [--demo runs/demo] [--samples 64] [--plot]``
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench._common import RESULTS_DIR, measure, provenance, read_rows, write_rows  # noqa: E402

BENCH = "teacher_cache"
# (name, dtype, logit top-k (None: the whole vocabulary), maps, map top-k)
OPTIONS = [("exact_fp32", "fp32", None, "exact", 1), ("exact_bf16", "bf16", None, "exact", 1),
           ("k128_m8", "bf16", 128, "topk", 8), ("k64_m4", "bf16", 64, "topk", 4),
           ("k32_m2", "bf16", 32, "topk", 2), ("k16_m1", "bf16", 16, "topk", 1),
           ("k8_m1", "bf16", 8, "topk", 1)]
LLAVA = dict(samples=665_000, tokens=2048, image_tokens=576, layers=7)


def kd_bytes_per_token(k: int, dtype: str) -> int:
    """Bytes per KD position: log-probabilities (k × 2 or 4), int32 ids (k × 4), the
    float32 rest mass and the int32 position."""
    return k * ((2 if dtype == "bf16" else 4) + 4) + 4 + 4


def map_bytes_per_row(maps: str, v: int, map_k: int, dtype: str) -> int:
    """Bytes per query row of one layer: the whole row, or top-k values, int16 ids (int32
    beyond 32,767 columns) and the float32 rest."""
    size = 2 if dtype == "bf16" else 4
    if maps == "exact":
        return v * size
    return min(map_k, v) * (size + (2 if v <= 32767 else 4)) + 4


def _config(demo: Path, data: Path, out: Path, teacher, weights=None):
    from compodistill.train.config import config_from_dict

    stage = {"kind": "dft", "trainable": "post_connector", "batch_size": 8, "max_steps": 1}
    if weights is not None:
        stage["weights"] = weights
    return config_from_dict({
        "student": str(demo / "student-warmup" / "1-student" / "model"), "teacher": teacher,
        "output_dir": str(out / "run"), "cpu_threads": 1, "seed": 0,
        "data": {"train_json": str(data), "image_folder": str(demo / "data"),
                 "max_length": 256},
        "vat": demo_vat(),
        "stages": [stage]})


def demo_vat() -> dict:
    """The VAT section of configs/demo.yaml: the layers the demo's 2-layer pair is matched on
    (a preset selects no layer of a model that shallow)."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    return yaml.safe_load((root / "configs" / "demo.yaml").read_text())["vat"]


def _cache_files(cache: Path) -> tuple[float, float, int, int, int]:
    """(logit bytes, map bytes, KD positions, samples, map rows per layer summed) of a cache."""
    from safetensors import safe_open

    kd = maps = positions = samples = rows = 0
    for shard in sorted(cache.glob("shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                field = name.split(".", 1)[1]
                if field.startswith("kd_"):
                    kd += t.numel() * t.element_size()
                    positions += t.shape[0] if field == "kd_pos" else 0
                elif field.startswith("map"):
                    maps += t.numel() * t.element_size()
                    rows += t.shape[0] if field in ("map0", "map0.rest") else 0
                elif field == "shape":
                    samples += 1
    return kd, maps, positions, samples, rows




def run(device, out_csv: Path, demo: Path, samples: int, repeat: int) -> list[dict]:
    from compodistill.teacher_cache.writer import write_teacher_cache
    from compodistill.train.stages import HiddenStates, prepare_trainable
    from compodistill.train.trainer import CompoDistillTrainer

    torch.set_num_threads(1)
    teacher_path = demo / "teacher-warmup" / "1-teacher" / "model"
    if not teacher_path.is_dir():
        raise SystemExit(f"{teacher_path} not found: run `compodistill demo --out {demo}` first")
    work = Path(tempfile.mkdtemp(prefix="bench_teacher_cache_"))
    records = json.loads((demo / "data" / "train.json").read_text())[:samples]
    data = work / "train.json"
    data.write_text(json.dumps(records))
    prov = provenance(device)
    rows = []

    def row(provider, metric, value, unit, extra=""):
        rows.append({"benchmark": BENCH, "provider": provider, "x_name": "option",
                     "x": provider, "metric": metric, "value": value, "unit": unit,
                     "extra": extra, **prov})

    # Online: the same batches, KD-only and VAT-only weights.
    kinds = {"kd": {"lm": 0.0, "kd": 1.0, "vat": 0.0}, "vat": {"lm": 0.0, "kd": 0.0, "vat": 1.0}}
    online, init = {}, {}
    for kind, weights in kinds.items():
        trainer = CompoDistillTrainer(_config(demo, data, work, str(teacher_path), weights),
                                      show_progress=False)
        online[kind] = trainer
    vocab = online["kd"].student.config.text_config.vocab_size

    def step_fn(trainer, student, batch, stage):
        losses = trainer.recipe.stage_parts(trainer, student, None, stage, work).losses
        module = HiddenStates(student)

        def step():
            terms = losses(module, batch)
            total = sum(t.value for t in terms.values())
            params = [p for p in student.parameters() if p.requires_grad]
            grads = torch.autograd.grad(total, params)
            return float(total.detach()), torch.cat([g.flatten() for g in grads])
        return step

    def prepared(trainer):
        from compodistill.hf.llava import apply_taf

        stage = trainer.config.stages[0]
        if trainer.teacher is not None:
            student = apply_taf(trainer.student, trainer.teacher)
        else:
            student = trainer.teacher_cache.apply_taf(trainer.student)
        if "post" in init:
            student.model.multi_modal_projector.post.load_state_dict(init["post"])
        else:
            init["post"] = {k: v.clone() for k, v in
                            student.model.multi_modal_projector.post.state_dict().items()}
        student, _ = prepare_trainable(student, stage)
        return student, stage

    reference = {}
    for kind, trainer in online.items():
        student, stage = prepared(trainer)
        reference[kind] = (student, stage)

    batches = None
    for name, dtype, k, maps, map_k in OPTIONS:
        cache = work / name
        k = vocab if k is None else k
        teacher = {"path": str(teacher_path), "cache": str(cache), "topk": k, "dtype": dtype,
                   "maps": maps, "map_topk": map_k, "shard_samples": 16, "batch_size": 8}
        write_teacher_cache(_config(demo, data, work, teacher), show_progress=False)
        kd_b, map_b, positions, n, q_rows = _cache_files(cache)
        manifest = json.loads((cache / "manifest.json").read_text())
        layers = len(manifest["vat"]["matches"])
        row(name, "bytes_per_kd_token", round(kd_b / positions, 2), "B",
            f"k={k} of V={vocab} {dtype}; formula {kd_bytes_per_token(k, dtype)}")
        row(name, "bytes_per_sample_maps", round(map_b / n, 1), "B",
            f"maps={maps} map_topk={map_k if maps == 'topk' else '-'} {dtype}; {layers} layers,"
            f" {q_rows / n:.1f} query rows/sample")
        per_token = LLAVA["samples"] * LLAVA["tokens"]
        k_llava = 151_936 if k >= vocab else k
        note = ("computed: 665k samples x 2048 tokens (all of them KD positions), 576 image "
                "tokens, 2048 query rows, 7 layers; k = V means V = 151,936")
        row(name, "llava665k_logits_gb", round(per_token * kd_bytes_per_token(
            k_llava, dtype) / 1e9, 1), "GB", note)
        row(name, "llava665k_maps_gb", round(per_token * LLAVA["layers"] * map_bytes_per_row(
            maps, LLAVA["image_tokens"], map_k, dtype) / 1e9, 1), "GB", note)
        for kind, weights in kinds.items():
            cfg = _config(demo, data, work, {"cache": str(cache)}, weights)
            trainer = CompoDistillTrainer(cfg, show_progress=False)
            student, stage = prepared(trainer)
            if batches is None:
                loader = iter(trainer.data_loader(stage))
                batches = [next(loader) for _ in range(2)]
            err, cos = [], []
            ref_student, ref_stage = reference[kind]
            for batch in batches:
                v_on, g_on = step_fn(online[kind], ref_student, batch, ref_stage)()
                v_ca, g_ca = step_fn(trainer, student, batch, stage)()
                err.append(abs(v_ca - v_on) / abs(v_on))
                cos.append(float(torch.nn.functional.cosine_similarity(g_ca, g_on, dim=0)))
            row(name, f"{kind}_rel_error", f"{max(err):.3g}", "", f"max over {len(batches)} "
                f"batches of 8; online {kind} loss {v_on:.4g}")
            row(name, f"{kind}_grad_cosine", f"{min(cos):.6f}", "", "min over batches")
            if kind == "vat" and name in ("exact_bf16", "k64_m4"):
                # A full DFT step (LM + KD + VAT) from the cache vs online.
                for provider, tr in (("online_teacher_resident", None), (name, trainer)):
                    full = _config(demo, data, work, str(teacher_path) if tr is None else
                                   {"cache": str(cache)})
                    t2 = CompoDistillTrainer(full, show_progress=False)
                    s2, st2 = prepared(t2)
                    fn = step_fn(t2, s2, batches[0], st2)
                    ms, mib = measure(fn, device, warmup=1, repeat=repeat)
                    held = sum(p.numel() * p.element_size() for p in s2.parameters())
                    if t2.teacher is not None:
                        held += sum(p.numel() * p.element_size() for p in t2.teacher.parameters())
                    tag = "step_online" if tr is None else f"step_cache_{name}"
                    row(tag, "step_ms", round(ms, 1), "ms", "DFT LM+KD+VAT, batch 8, 1 thread")
                    row(tag, "step_peak_mib", round(mib, 2), "MiB", "tensors allocated in the step")
                    row(tag, "resident_mib", round(held / 2**20, 2), "MiB", "parameters held")
    shutil.rmtree(work, ignore_errors=True)
    write_rows(out_csv, rows)
    return rows


def plot(csv_path: Path, device_name: str, png_path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_rows(csv_path) if r["benchmark"] == BENCH
            and r["device"] == device_name]
    latest = {}
    for r in rows:
        latest[(r["provider"], r["metric"])] = r
    names = [o[0] for o in OPTIONS]
    panels = [("bytes_per_kd_token", "logit bytes / KD token"),
              ("bytes_per_sample_maps", "map bytes / sample"),
              ("kd_rel_error", "KD loss rel. error"), ("vat_rel_error", "VAT loss rel. error"),
              ("llava665k_logits_gb", "LLaVA-665k DFT logits, GB (computed)"),
              ("llava665k_maps_gb", "LLaVA-665k DFT maps, GB (computed)")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (metric, title) in zip(axes.flat, panels):
        vals = [float(latest[(n, metric)]["value"]) if (n, metric) in latest else float("nan")
                for n in names]
        ax.bar(range(len(names)), vals, color="C0")
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_title(title, fontsize=10)
        if metric.startswith(("bytes", "llava")):
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"teacher cache on {device_name} (demo-sized tiny pair)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{BENCH}.csv")
    parser.add_argument("--plot", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    rows = run(device, args.out, args.demo, args.samples, args.repeat)
    print(f"wrote {len(rows)} rows to {args.out}")
    for r in rows:
        print(f"{r['provider']:24s} {r['metric']:22s} {r['value']:>12} {r['unit']:4s} {r['extra']}")
    if args.plot:
        print(f"plot: {plot(args.out, rows[0]['device'], args.out.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
