"""Memory model: per-GPU bytes of a DFT step under FSDP2, from model configs (no download).

For a teacher → student pair shaped like Qwen2.5-VL (7B → 3B and 72B → 7B; the shape numbers
of their ``config.json`` are written below) and 1, 2, 8 and 16 GPUs, it computes per GPU:

- ``weights_student``: every parameter sharded on dim 0 in chunks of ceil(n / N) (FSDP2's
  rule); frozen weights in bf16, trainable ones (LoRA r128 on the LM's linears, the TAF
  post-connector) in fp32, as accelerate upcasts them under bf16 mixed precision.
- ``weights_teacher``: the teacher sharded the same way, bf16, frozen; 0 with a teacher cache
  (targets precomputed offline: no teacher weights on the GPU).
- ``gathered``: the transient full (bf16) copies FSDP2 holds at the peak: the student's root
  group (embeddings, lm_head, connector, norms: kept for the whole step so lm_head is gathered
  once), the teacher's lm_head and root group, and two layers (the current one and the
  prefetched next), the largest of either model. 0 on one GPU.
- ``grads``, ``optimizer``: fp32 gradients and AdamW's two fp32 moments of the trainable
  parameters, sharded.
- ``activations``: the student's saved activations for one micro-batch of ``--tokens`` tokens
  with gradient checkpointing: each decoder layer's input (bf16) plus one layer recomputed at
  34·T·h bytes (Korthikanti et al. 2022, without the attention-score term, which the flash
  and fused attention never store). Not sharded. The vision tower is frozen and sits before
  any trainable weight in DFT, so it saves nothing.

The sharded-teacher cache run (``compodistill teacher-cache`` with ``teacher.shard``,
docs/teacher_cache.md) for 72B and 32B teachers at 1, 2 and 8 devices, per device:

- ``weights_teacher``: the teacher sharded as above (bf16, frozen); whole on one device.
- ``gathered``: the root group (embeddings, vision patch embedding and merger, final norm)
  and the untied ``lm_head`` (gathered around each batch: the KD targets read it), plus two
  layers (the current one and the prefetched next), the largest of the teacher's. 0 on one
  device.
- ``activations``: an estimate for one teacher batch of ``--tokens`` tokens in inference mode
  (nothing is saved for a backward): the hidden states in and out of the running layer and
  its MLP's gate, up and product, T·(2·h + 3·I)·2 bytes. The vision tower's (width 1280) are
  smaller and not counted, nor the VAT map targets (Q·Nv·4 bytes per matched layer).
- ``kd_logits``: one chunk of 256 KD rows of fp32 logits over the vocabulary, three live
  copies (logits, the top-k-masked copy, its exp), as ``targets.logit_targets`` computes them.

The parameter counts come from the real transformers classes built on the meta device.
``--check REPORT_DIR`` compares the same sharding arithmetic, applied to the tiny models of a
CPU run, with the local shard shapes that run measured (``tests/fsdp_run.py`` reports, or
``tests/teacher_cache_run.py`` ones of a sharded cache run); a check row with ``value`` 0
means predicted == measured, element for element.

Usage: ``python bench/fsdp_memory.py [--tokens 4096] [--check DIR [--check DIR]] [--out CSV]``
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench._common import RESULTS_DIR, provenance, write_rows  # noqa: E402

BENCH = "fsdp_memory"
GPUS = (1, 2, 8, 16)
LORA_R = 128
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GIB = 2 ** 30

# Shape numbers of the Qwen2.5-VL Instruct config.json files (3B, 7B, 72B; 32B's from its
# published configuration, not re-read offline: 33.4B parameters on the meta device). The vision
# tower (32 blocks, width 1280) is the same in all three; its merger ends at the LM width.
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112,
              fullatt_block_indexes=[7, 15, 23, 31])
TEXT = {
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
               tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
               tie_word_embeddings=False),
    "32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                tie_word_embeddings=False),
    "72b": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, vocab_size=152064,
                tie_word_embeddings=False),
}
PAIRS = (("7b", "3b"), ("72b", "7b"))
CACHE_TEACHERS = ("72b", "32b")  # the sharded-teacher cache run
CACHE_DEVICES = (1, 2, 8)
KD_CHUNK = 256  # rows per logit chunk in teacher_cache/targets.py


def qwen25_vl(size: str) -> torch.nn.Module:
    """A Qwen2.5-VL model of that size on the meta device (shapes only)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = TEXT[size]
    config = Qwen2_5_VLConfig(text_config=dict(text),
                              vision_config={**VISION, "out_hidden_size": text["hidden_size"]},
                              tie_word_embeddings=text["tie_word_embeddings"])
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(config)


# ------------------------------------------------------------------ parameters and units
def units(model: torch.nn.Module) -> dict:
    """``{name: (shape, unit)}`` for every distinct parameter; ``unit`` is the FSDP2 group:
    the layer (a ``_no_split_modules`` class instance) holding it, or ``"root"``."""
    from compodistill.train.distributed import wrap_classes

    classes = wrap_classes(model)
    owner, seen, out = {}, set(), {}
    for name, module in model.named_modules():
        if classes and isinstance(module, classes):
            for pname, _ in module.named_parameters():
                owner.setdefault(f"{name}.{pname}", name)
    for name, p in model.named_parameters():  # named_parameters drops tied duplicates
        if id(p) in seen:
            continue
        seen.add(id(p))
        out[name] = (tuple(p.shape), owner.get(name, "root"))
    return out


def lora_params(model: torch.nn.Module, r: int) -> dict:
    """LoRA A (r × in) and B (out × r) of every target linear of the language model."""
    out = {}
    for name, module in model.named_modules():
        if ("language_model" in name and name.rsplit(".", 1)[-1] in LORA_TARGETS
                and isinstance(module, torch.nn.Linear)):
            out[f"{name}.lora_A"] = (r, module.in_features)
            out[f"{name}.lora_B"] = (module.out_features, r)
    return out


def shard_numel(shape: tuple, world: int, rank: int = 0) -> int:
    """Elements rank ``rank`` holds of a parameter sharded on dim 0 in ceil(n / world) chunks."""
    if not shape:
        return 1 if rank == 0 else 0
    chunk = math.ceil(shape[0] / world)
    rows = max(0, min(chunk, shape[0] - rank * chunk))
    return rows * math.prod(shape[1:])


# ------------------------------------------------------------------ the model
def dft_memory(teacher_size: str, student_size: str, world: int, tokens: int,
               teacher_cache: bool) -> dict:
    """Per-GPU bytes of a DFT step (LoRA + TAF post-connector trainable, teacher used)."""
    teacher, student = qwen25_vl(teacher_size), qwen25_vl(student_size)
    t_units, s_units = units(teacher), units(student)
    d_t, d_s = TEXT[teacher_size]["hidden_size"], TEXT[student_size]["hidden_size"]
    # TAF: the student's merger is replaced by the teacher's (frozen) plus Linear(d_t, d_s).
    s_frozen = {n: v for n, v in s_units.items() if not n.startswith("model.visual.merger")}
    s_frozen.update({f"taf.{n}": v for n, v in t_units.items()
                     if n.startswith("model.visual.merger")})
    trainable = {"taf.post.weight": (d_s, d_t), "taf.post.bias": (d_s,),
                 **lora_params(student, LORA_R)}

    def sharded(params, bytes_per):
        return sum(shard_numel(shape, world) for shape in params) * bytes_per

    out = {
        "weights_student": sharded([s for s, _ in s_frozen.values()], 2)
        + sharded(trainable.values(), 4),
        "weights_teacher": 0 if teacher_cache else sharded([s for s, _ in t_units.values()], 2),
        "grads": sharded(trainable.values(), 4),
        "optimizer": 2 * sharded(trainable.values(), 4),
    }

    def group_numel(table, unit):
        return sum(math.prod(s) for s, u in table.values() if u == unit)

    def largest_layer(table):
        return max(group_numel(table, u) for u in {u for _, u in table.values()} - {"root"})

    gathered = 0
    if world > 1:
        gathered = 2 * group_numel(s_frozen, "root")
        layer = largest_layer(s_frozen)
        if not teacher_cache:
            # The teacher's lm_head (and its root group while the teacher runs).
            gathered += 2 * group_numel(t_units, "root")
            layer = max(layer, largest_layer(t_units))
        gathered += 2 * 2 * layer
    out["gathered"] = gathered
    layers = TEXT[student_size]["num_hidden_layers"]
    out["activations"] = layers * tokens * d_s * 2 + 34 * tokens * d_s
    out["total"] = sum(out.values())
    return out


def cache_run_memory(teacher_size: str, world: int, tokens: int) -> dict:
    """Per-device bytes of the cache run with the teacher sharded over ``world`` devices."""
    teacher = qwen25_vl(teacher_size)
    t_units = units(teacher)
    text = TEXT[teacher_size]
    out = {"weights_teacher": sum(shard_numel(s, world) for s, _ in t_units.values()) * 2}
    gathered = 0
    if world > 1:
        groups = {}
        for shape, unit in t_units.values():
            groups[unit] = groups.get(unit, 0) + math.prod(shape)
        layer = max(n for u, n in groups.items() if u != "root")
        gathered = 2 * groups["root"] + 2 * 2 * layer  # root (lm_head in it here) + 2 layers
    out["gathered"] = gathered
    out["activations"] = tokens * (2 * text["hidden_size"] + 3 * text["intermediate_size"]) * 2
    out["kd_logits"] = 3 * min(KD_CHUNK, tokens) * text["vocab_size"] * 4
    out["total"] = sum(out.values())
    out["parameters"] = sum(math.prod(s) for s, _ in t_units.values())  # not in the total
    return out


# ------------------------------------------------------------------ check on a CPU run
def check(report_dir: Path) -> list[dict]:
    """Predicted vs measured local shard elements of each rank, student and teacher, per stage
    of a ``tests/fsdp_run.py`` run; the prediction rebuilds the run's models from their config
    folders (``pair/student``, ``pair/teacher`` next to the run) on the meta device."""
    rows = []
    reports = sorted(report_dir.glob("report-rank*.json"))
    world = len(reports)
    for rank, path in enumerate(reports):
        report = json.loads(path.read_text())
        for stage, entry in report.items():
            for kind in ("student", "teacher"):
                if kind not in entry:  # a cache run's report has the teacher only
                    continue
                measured = sum(math.prod(local) for local, _ in entry[kind].values())
                predicted = sum(shard_numel(tuple(full), world, rank)
                                for _, full in entry[kind].values())
                # The full shapes themselves, from the configs:
                rows.append(dict(provider=f"cpu-run/{stage}/{kind}", x_name="rank", x=rank,
                                 metric="predicted_minus_measured_elements",
                                 value=predicted - measured, unit="elements",
                                 extra=f"measured={measured}; world={world}"))
    return rows


def config_check(root: Path, report_dir: Path) -> list[dict]:
    """The full parameter shapes the run reported vs those built from its config folders."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    report = json.loads(sorted(report_dir.glob("report-rank*.json"))[0].read_text())
    rows = []
    for kind in ("teacher",):
        config = AutoConfig.from_pretrained(root / kind, local_files_only=True)
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
        built = {n: list(s) for n, (s, _) in units(model).items()}
        for stage, entry in report.items():
            ran = {n: full for n, (_, full) in entry[kind].items()}
            rows.append(dict(provider=f"cpu-run/{stage}/{kind}", x_name="rank", x="all",
                             metric="config_shapes_differ", value=int(built != ran),
                             unit="bool", extra=f"params={len(built)}"))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096,
                        help="tokens per GPU micro-batch (activations)")
    parser.add_argument("--check", type=Path, action="append", default=[],
                        help="a tests/fsdp_run.py output folder, or a tests/teacher_cache_run.py "
                             "report folder, to check the shard arithmetic on (repeatable)")
    parser.add_argument("--pair-root", type=Path, default=None,
                        help="the folder with that run's student/ and teacher/ configs")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{BENCH}.csv")
    args = parser.parse_args(argv)
    meta = provenance(torch.device("cpu"))
    meta["device"] = "model (computed)"
    rows = []
    for teacher, student in PAIRS:
        for cache in (False, True):
            for world in GPUS:
                mem = dft_memory(teacher, student, world, args.tokens, cache)
                for metric, value in mem.items():
                    rows.append(dict(provider=f"qwen2.5-vl-{teacher}->{student}", x_name="gpus",
                                     x=world, metric=metric, value=round(value / GIB, 3),
                                     unit="GiB", extra=f"teacher_cache={'yes' if cache else 'no'};"
                                     f" tokens={args.tokens}; lora_r={LORA_R}"))
    for size in CACHE_TEACHERS:
        for world in CACHE_DEVICES:
            mem = cache_run_memory(size, world, args.tokens)
            for metric, value in mem.items():
                rows.append(dict(provider=f"qwen2.5-vl-{size}/teacher-cache-run", x_name="gpus",
                                 x=world, metric=metric,
                                 value=value if metric == "parameters" else round(value / GIB, 3),
                                 unit="params" if metric == "parameters" else "GiB",
                                 extra=f"teacher sharded (FSDP2, bf16); tokens={args.tokens}"))
    for folder in args.check:
        checked = check(folder)
        if args.pair_root is not None and "cache" not in _first_report(folder):
            checked += config_check(args.pair_root, folder)
        rows += [{**r, "benchmark": BENCH, **provenance(torch.device("cpu"))} for r in checked]
    write_rows(args.out, [{"benchmark": BENCH, **meta, **r} if "device" not in r else r
                          for r in rows])
    table(rows)


def _first_report(folder: Path) -> dict:
    return json.loads(sorted(folder.glob("report-rank*.json"))[0].read_text())


def table(rows: list[dict]) -> None:
    """Print the totals as Markdown tables (GiB per GPU)."""
    cache = [r for r in rows if str(r["provider"]).endswith("teacher-cache-run")]
    rows = [r for r in rows if r not in cache]
    print("| teacher (cache run) | " + " | ".join(f"{n} GPU" for n in CACHE_DEVICES) + " |")
    print("|---|" + "---|" * len(CACHE_DEVICES))
    for provider in dict.fromkeys(r["provider"] for r in cache):
        for metric in ("weights_teacher", "gathered", "total"):
            values = [r["value"] for r in cache if r["provider"] == provider
                      and r["metric"] == metric]
            print(f"| {provider.split('/')[0]} {metric} | "
                  + " | ".join(f"{v:.1f}" for v in values) + " |")
    totals = [r for r in rows if r["metric"] == "total"]
    print("| pair | teacher cache | " + " | ".join(f"{n} GPU" for n in GPUS) + " |")
    print("|---|---|" + "---|" * len(GPUS))
    for pair in dict.fromkeys(r["provider"] for r in totals):
        for cache in ("no", "yes"):
            values = [r["value"] for r in totals if r["provider"] == pair
                      and f"teacher_cache={cache}" in r["extra"]]
            print(f"| {pair} | {cache} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    for r in rows:
        if r["metric"] != "total" and not str(r["provider"]).startswith("qwen"):
            print(r["provider"], r["x"], r["metric"], r["value"], r.get("extra", ""))


if __name__ == "__main__":
    main()
