"""Benchmark: student attention fwd+bwd with the visual-attention loss against a teacher target.

Providers (x = sequence length N; ``[mha]``/``[gqa]`` suffix = head layout):
- ``flash``: our Triton flash attention, student fwd + bwd only (no maps, no teacher): the floor.
- ``fused``: our fused path: teacher fwd with its visual map (no grad), student
  :func:`attention_with_visual_maps` fwd + bwd, flat-cosine loss on the maps.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` student fwd + bwd and teacher
  fwd, no maps (what attention costs without the loss).
- ``chunked``: SDPA for the outputs + the chunked PyTorch maps of ``compodistill.visual_attention.api``
  (``backend="torch"``) for both models, flat-cosine loss.
- ``eager``: materialised softmax of both models (``P`` in full), maps from ``P``, loss.

Student gradient = dO on the output (random) + the loss on the maps. TFLOP/s counts only the
attention matmuls of student fwd+bwd and teacher fwd (4·B·H·pairs·d per forward, pairs = N²/2
causal or N·W - W(W-1)/2 with a window W; 2.5× that for a backward), the same numerator for every provider that runs the teacher, so the
column compares wall time on a common scale. An OOM is a row with value ``oom``.

``--window W``: Gemma 3's sliding-window layers (query i sees keys j with i - j < W) in every
provider: the kernels skip the key/query blocks outside the window, SDPA gets the boolean
causal-window mask (no flash kernel takes one), eager and chunked mask the same pairs;
providers are labelled ``name-wW[variant]``.

``--head-dim D``: every provider at head dim D instead of the shape's (256: Gemma 3 4B/12B,
whose kernels use the 256 class of the fit tables); providers are labelled ``name-dD[variant]``.

Usage: ``python bench/visual_attention.py [--device cuda|cpu] [--sizes N ...] [--window W]
[--head-dim D] [--out CSV] [--plot]``
CUDA: N 1k..16k, B=2, student 16 heads, teacher 32 heads, d=128, Nv=576 image tokens from
position 32, causal, bf16; GQA variant student kv 4, teacher kv 8.
CPU: N 128/256, 2 and 4 heads, d=32, 32 image tokens, float32; the Triton providers run only
under TRITON_INTERPRET=1 (slow), otherwise the torch providers alone.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench._common import benchmark_main, measure, plot_lines, provenance, write_rows  # noqa: E402
from compodistill.visual_attention.layout import visual_layout  # noqa: E402
from compodistill.visual_attention.api import visual_attention_maps  # noqa: E402

try:
    from compodistill.visual_attention.api import visual_map_loss
except ImportError:  # older checkout: a plain flat cosine over the maps
    visual_map_loss = None

try:
    from compodistill import kernels as K
except ImportError:
    K = None

BENCH = "visual_attention"
SHAPES = {
    "cuda": dict(sizes=[1024, 2048, 4096, 8192, 16384], batch=2, hs=16, ht=32, d=128,
                 nv=576, image_start=32, dtype=torch.bfloat16,
                 variants={"mha": (16, 32), "gqa": (4, 8)}),
    "cpu": dict(sizes=[128, 256], batch=2, hs=2, ht=4, d=32, nv=32, image_start=8,
                dtype=torch.float32, variants={"mha": (2, 4), "gqa": (1, 2)}),
}


def _map_loss(a_s: torch.Tensor, a_t: torch.Tensor, layout) -> torch.Tensor:
    if visual_map_loss is not None:
        return visual_map_loss(a_s, a_t, layout, loss="cosine", cosine="flat")
    return 1.0 - F.cosine_similarity(a_s.flatten(1), a_t.flatten(1), dim=1, eps=1e-12).mean()


def _repeat(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _allowed_pairs(n: int, window: int | None, device) -> torch.Tensor:
    """(N, N) bool: causal, and inside the sliding window when there is one."""
    i = torch.arange(n, device=device)
    ok = i[:, None] >= i[None, :]
    return ok if window is None else ok & (i[:, None] - i[None, :] < window)


def _eager_attention(q, k, v, layout):
    """Materialised causal (windowed) softmax: output and gathered head-mean maps."""
    n = q.shape[2]
    s = (q @ _repeat(k, q.shape[1]).transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    s = s.masked_fill(~_allowed_pairs(n, layout.window, q.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = p.to(q.dtype) @ _repeat(v, q.shape[1])
    head_mean = p.mean(1)
    rows = torch.gather(head_mean, 1, layout.query_index[:, :, None].expand(-1, -1, n))
    maps = torch.gather(rows, 2, layout.visual_index[:, None, :].expand(-1, rows.shape[1], -1))
    return out, maps * layout.allowed()


def make_inputs(n, batch, hs, ht, d, hkv_s, hkv_t, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)

    student = [rnd(batch, hs, n, d, grad=True), rnd(batch, hkv_s, n, d, grad=True),
               rnd(batch, hkv_s, n, d, grad=True)]
    teacher = [rnd(batch, ht, n, d), rnd(batch, hkv_t, n, d), rnd(batch, hkv_t, n, d)]
    d_out = rnd(batch, hs, n, d)
    return student, teacher, d_out


def providers(student, teacher, d_out, layout, device, use_triton):
    qs, ks, vs = student
    qt, kt, vt = teacher

    def grads(outputs, grad_outputs):
        return torch.autograd.grad(outputs, student, grad_outputs)

    window = layout.window
    mask = None if window is None else _allowed_pairs(qs.shape[2], window, qs.device)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=q.shape[1] != k.shape[1])

    def flash():
        out = K.flash_attention(qs, ks, vs, causal=True, window=window)
        return grads([out], [d_out])

    def fused():
        _, target = K.teacher_attention_with_visual_maps(qt, kt, vt, layout)
        out, maps = K.attention_with_visual_maps(qs, ks, vs, layout)
        return grads([out, _map_loss(maps, target, layout)], [d_out, None])

    def sdpa_only():
        with torch.no_grad():
            sdpa(qt, kt, vt)
        return grads([sdpa(qs, ks, vs)], [d_out])

    def chunked():
        with torch.no_grad():
            sdpa(qt, kt, vt)
            target = visual_attention_maps(qt, kt, layout, backend="torch")
        out = sdpa(qs, ks, vs)
        maps = visual_attention_maps(qs, ks, layout, backend="torch")
        return grads([out, _map_loss(maps, target, layout)], [d_out, None])

    def eager():
        with torch.no_grad():
            _, target = _eager_attention(qt, kt, vt, layout)
        out, maps = _eager_attention(qs, ks, vs, layout)
        return grads([out, _map_loss(maps, target, layout)], [d_out, None])

    by_name = {}
    if use_triton:
        by_name.update(flash=flash, fused=fused)
    by_name.update(sdpa=sdpa_only, chunked=chunked, eager=eager)
    return by_name


def _flops(name, batch, hs, ht, n, d, window=None):
    # Attended pairs: n²/2 causal; with a window W, n·W - W(W-1)/2 (rows before W see fewer).
    pairs = n * n / 2 if window is None else n * window - window * (window - 1) / 2
    fwd = lambda heads: 4 * batch * heads * pairs * d  # noqa: E731
    student = fwd(hs) * 3.5  # forward + backward (2.5x)
    return student if name == "flash" else student + fwd(ht)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def run(device: torch.device, csv_path: Path, sizes=None, repeat: int = 5,
        window: int | None = None, head_dim: int | None = None) -> list[dict]:
    shape = SHAPES["cuda" if device.type == "cuda" else "cpu"]
    sizes = sizes or shape["sizes"]
    use_triton = K is not None and K.HAS_TRITON and (device.type == "cuda" or K.interpreting())
    prov = provenance(device)
    batch, hs, ht = shape["batch"], shape["hs"], shape["ht"]
    d = head_dim or shape["d"]
    rows, written = [], 0
    for variant, (hkv_s, hkv_t) in shape["variants"].items():
        for n in sizes:
            start = min(shape["image_start"], max(0, n - shape["nv"]))
            nv = min(shape["nv"], n - start)
            layout = visual_layout([[(start, start + nv)]] * batch, batch, n, query="all",
                                   causal=True, device=device,
                                   window=window if window is not None and window < n else None)
            inputs = make_inputs(n, batch, hs, ht, d, hkv_s, hkv_t, shape["dtype"], device)
            extra = (f"B={batch} Hs={hs}/{hkv_s} Ht={ht}/{hkv_t} d={d} Nv={nv} "
                     f"{str(shape['dtype']).replace('torch.', '')} causal"
                     + (f" window={layout.window}" if layout.window else ""))
            for name, fn in providers(*inputs, layout, device, use_triton).items():
                try:
                    ms, mib = measure(fn, device, repeat=repeat)
                    values = (f"{ms:.4g}", f"{mib:.4g}",
                              f"{_flops(name, batch, hs, ht, n, d, layout.window) / (ms * 1e-3) / 1e12:.4g}")
                except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
                    if not _is_oom(err):
                        raise
                    values = ("oom",) * 3
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                label = (f"{name}{f'-w{window}' if window else ''}"
                         f"{f'-d{head_dim}' if head_dim else ''}[{variant}]")
                for metric, value, unit in zip(("time", "peak_memory", "tflops"), values,
                                               ("ms", "MiB", "TFLOP/s")):
                    rows.append(dict(benchmark=BENCH, provider=label, x_name="N", x=n,
                                     metric=metric, value=value, unit=unit, extra=extra, **prov))
                print(f"{label:>14} N={n:>6}  {values[0]:>9} ms  {values[1]:>9} MiB  "
                      f"{values[2]:>7} TFLOP/s")
            # Written per size: a run stopped by a time limit keeps the sizes it finished.
            write_rows(csv_path, rows[written:])
            written = len(rows)
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def plot(csv_path: Path, device_name: str, png_path: Path) -> Path:
    """Time, peak memory and TFLOP/s against N per provider (rows of ``device_name``)."""
    metrics = [("time", "ms"), ("peak_memory", "MiB"), ("tflops", "TFLOP/s")]
    return plot_lines(csv_path, BENCH, device_name, png_path, metrics, "sequence length N")

def _note_skipped_providers(device: torch.device) -> None:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("cpu: Triton providers skipped (set TRITON_INTERPRET=1 to run them, slowly)")


def main(argv=None) -> None:
    import argparse
    import functools

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--window", type=int, default=None,
                     help="sliding window W (Gemma 3's local layers; 1024 there)")
    pre.add_argument("--head-dim", type=int, default=None,
                     help="head dim of every provider (256: Gemma 3 4B/12B)")
    known, rest = pre.parse_known_args(argv)
    if known.window is not None and known.window < 1:
        raise SystemExit(f"--window must be >= 1, got {known.window}")
    if known.head_dim is not None and not 1 <= known.head_dim <= 256:
        raise SystemExit(f"--head-dim must be in [1, 256] (the kernels' range), "
                         f"got {known.head_dim}")
    benchmark_main(rest, doc=__doc__, bench=BENCH,
                   run=functools.partial(run, window=known.window, head_dim=known.head_dim),
                   plot=plot,
                   sweep=("--sizes", dict(type=int, help="override the sequence lengths")),
                   before_run=_note_skipped_providers)

if __name__ == "__main__":
    main()
