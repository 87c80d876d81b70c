"""Benchmark: logit distillation from hidden states, forward + backward.

Providers:
- ``torch_naive``: materialised logits of both models + ``F.kl_div`` on float32 log-probs;
- ``compodistill``: :func:`compodistill.logit_kd.linear.linear_distillation_loss` (fused, chunked);
- ``liger``: Liger-Kernel's ``LigerFusedLinearJSD`` (jsd_beta=0, Liger's forward-KL setting),
  when ``liger_kernel`` imports and the device is CUDA.

All tokens are selected (every label valid), KL(p_t‖p_s), T = 1. Rows (time in ms, peak memory
in MiB on CUDA) are appended to ``bench/results/logit_kd.csv`` through ``bench/_common.py``;
``--plot`` draws a PNG from that CSV.

Usage: ``python bench/logit_kd.py [--device cuda|cpu] [--out CSV] [--plot]``
CUDA: tokens 2k/8k/16k, vocab 151,936, d_s 1536, d_t 2048, bf16.
CPU: tokens 256/1024/2048, vocab 32,000, d_s 64, d_t 96, float32 (peak = live tensor bytes).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench._common import benchmark_main, measure, plot_lines, provenance, write_rows  # noqa: E402
from compodistill.logit_kd.linear import linear_distillation_loss  # noqa: E402

BENCH = "logit_kd"
SHAPES = {
    "cuda": dict(tokens=[2048, 8192, 16384], vocab=151_936, d_s=1536, d_t=2048,
                 dtype=torch.bfloat16),
    "cpu": dict(tokens=[256, 1024, 2048], vocab=32000, d_s=64, d_t=96, dtype=torch.float32),
}


def _inputs(tokens, vocab, d_s, d_t, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    h_s = rnd(tokens, d_s, scale=1.0).requires_grad_(True)
    w_s = rnd(vocab, d_s, scale=d_s ** -0.5).requires_grad_(True)
    h_t = rnd(tokens, d_t, scale=1.0)
    w_t = rnd(vocab, d_t, scale=d_t ** -0.5)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    return h_s, w_s, h_t, w_t, labels


def _providers(h_s, w_s, h_t, w_t, labels, device):
    def torch_naive():
        zs = (h_s @ w_s.T).float()
        zt = (h_t @ w_t.T).float()
        loss = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True,
                        reduction="batchmean")
        return torch.autograd.grad(loss, [h_s, w_s])

    def ours():
        loss = linear_distillation_loss(h_s, w_s, h_t, w_t, labels, loss="kl")
        return torch.autograd.grad(loss, [h_s, w_s])

    providers = {"torch_naive": torch_naive, "compodistill": ours}
    if device.type == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD
        except Exception:  # not installed: benchmark the others
            LigerFusedLinearJSD = None
        if LigerFusedLinearJSD is not None:
            liger = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)

            def liger_jsd():
                loss = liger(h_s, w_s, h_t, w_t, labels)
                return torch.autograd.grad(loss, [h_s, w_s])

            providers["liger"] = liger_jsd
    return providers


def run(device: torch.device, csv_path: Path, tokens=None, repeat: int = 5) -> list[dict]:
    shape = dict(SHAPES["cuda" if device.type == "cuda" else "cpu"])
    tokens = tokens or shape.pop("tokens")
    shape.pop("tokens", None)
    prov = provenance(device)
    rows = []
    for n in tokens:
        inputs = _inputs(n, device=device, **shape)
        for name, fn in _providers(*inputs, device).items():
            extra = f"V={shape['vocab']} d_s={shape['d_s']} d_t={shape['d_t']} {shape['dtype']}"
            try:
                ms, mib = measure(fn, device, repeat=repeat)
            except torch.cuda.OutOfMemoryError:
                ms = mib = float("nan")
                extra += " OOM"
                torch.cuda.empty_cache()
            for metric, value, unit in (("time", ms, "ms"), ("peak_memory", mib, "MiB")):
                rows.append(dict(benchmark=BENCH, provider=name, x_name="tokens", x=n,
                                 metric=metric, value=f"{value:.4g}", unit=unit, extra=extra,
                                 **prov))
            print(f"{name:>13} tokens={n:>6}  {ms:9.2f} ms  {mib:9.1f} MiB  {extra}")
        del inputs
    write_rows(csv_path, rows)
    return rows


def plot(csv_path: Path, device_name: str, png_path: Path) -> Path:
    """Time and peak memory against tokens for each provider (rows of ``device_name``)."""
    metrics = [("time", "ms"), ("peak_memory", "MiB")]
    return plot_lines(csv_path, BENCH, device_name, png_path, metrics, "tokens")

def main(argv=None) -> None:
    benchmark_main(argv, doc=__doc__, bench=BENCH, run=run, plot=plot,
                   sweep=("--tokens", dict(type=int, help="override the token counts")))

if __name__ == "__main__":
    main()
