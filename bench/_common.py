"""Shared benchmark plumbing: timing, peak memory, and CSV rows with provenance.

Every benchmark appends rows (benchmark, provider, x, metric, value, plus device, date,
library versions and git commit) to one CSV in ``bench/results/``; plots are drawn from
the CSV so a figure can always be traced back to the numbers behind it.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from compodistill import visual_map_loss

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FIELDS = ["benchmark", "provider", "x_name", "x", "metric", "value", "unit", "extra",
          "device", "date", "torch", "triton", "transformers", "git_commit"]


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: say so in the row rather than crash
        return "none"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=Path(__file__).parent,
                               timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except Exception:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}x{os.cpu_count()}"


def provenance(device: torch.device) -> dict:
    return {
        "device": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "git_commit": _git_commit(),
    }


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 2,
            repeat: int = 5) -> tuple[float, float]:
    """Median wall time (ms) and peak extra memory (MiB) of ``fn()``.

    CUDA: the allocator's peak above what was allocated before. CPU: the peak of live
    tensor bytes created inside ``fn`` (``compodistill.testing.memory``), measured in one extra
    untimed call because the tracking slows the call down.
    Raises torch.cuda.OutOfMemoryError unchanged so the caller can record an OOM.
    """
    from compodistill.testing.memory import peak_memory

    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    with peak_memory(device) as mem:
        times = []
        for _ in range(repeat if cuda else 0):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
        if not cuda:
            fn()
    for _ in range(0 if cuda else repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], mem.mib


def step_rows(fn: Callable[[], object], device: torch.device, model: torch.nn.Module, *,
              bench: str, provider: str, b: int, n: int, extra: str, prov: dict,
              repeat: int) -> list[dict]:
    """Time one model step at batch ``b`` x ``n`` tokens: rows of time, tokens/s and peak
    memory (NaN and " OOM" in ``extra`` when it runs out), gradients of ``model`` cleared
    after. The line it prints is the one every model-step benchmark shows."""
    try:
        ms, mib = measure(fn, device, warmup=1, repeat=repeat)
    except torch.cuda.OutOfMemoryError:
        ms = mib = float("nan")
        extra += " OOM"
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tps = b * n / (ms / 1e3) if ms == ms else float("nan")
    print(f"{provider:>24} {b}x{n:<6} {ms:9.1f} ms {tps:10.0f} tok/s {mib:9.1f} MiB  {extra}")
    return [dict(benchmark=bench, provider=provider, x_name="BxN", x=f"{b}x{n}", metric=metric,
                 value=f"{value:.4g}", unit=unit, extra=extra, **prov)
            for metric, value, unit in (("time", ms, "ms"), ("tokens_per_s", tps, "tok/s"),
                                        ("peak_memory", mib, "MiB"))]


def write_rows(csv_path: Path, rows: Iterable[dict]) -> Path:
    """Append rows to ``csv_path`` (header written once)."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})
    return csv_path


def read_rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def benchmark_main(argv, *, doc: str, bench: str, run, plot, sweep: tuple[str, dict],
                   repeat: int = 5, before_run=None) -> list[dict]:
    """The shared command line of the benchmarks: device, sweep override, CSV, plot.

    ``sweep`` is ``(flag, argparse kwargs)`` for the benchmark's own sweep (sizes, tokens,
    shapes); ``run(device, out, sweep_values, repeat)`` returns the rows it wrote and
    ``plot(csv, device_name, png)`` draws them.
    """
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{bench}.csv")
    parser.add_argument("--plot", action="store_true", help="also write <out>.png")
    parser.add_argument("--repeat", type=int, default=repeat)
    flag, kwargs = sweep
    parser.add_argument(flag, dest="sweep", nargs="*", **kwargs)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if before_run is not None:
        before_run(device)
    rows = run(device, args.out, args.sweep, args.repeat)
    print(f"wrote {len(rows)} rows to {args.out}")
    if args.plot:
        print(f"plot: {plot(args.out, rows[0]['device'], args.out.with_suffix('.png'))}")
    return rows


def plot_lines(csv_path: Path, benchmark: str, device_name: str, png_path: Path,
               metrics: list[tuple[str, str]], x_label: str) -> Path:
    """One panel per (metric, unit): value against x for each provider, log-log.

    Only rows of ``benchmark`` on ``device_name`` are drawn (the latest row per x wins);
    ``provider[variant]`` names share a colour, ``[gqa]`` variants are dashed, and OOM rows
    are an 'x' on the floor of their panel.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_rows(csv_path)
            if r["benchmark"] == benchmark and r["device"] == device_name]
    providers = sorted({r["provider"] for r in rows})
    colors = {b: f"C{i}" for i, b in enumerate(sorted({p.split("[")[0] for p in providers}))}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.5), squeeze=False)
    for ax, (metric, unit) in zip(axes[0], metrics):
        ooms, positive = [], False
        for provider in providers:
            points = {}
            for r in rows:
                if r["provider"] == provider and r["metric"] == metric:
                    if r["value"] == "oom":
                        ooms.append((provider, float(r["x"])))
                    elif r["value"] not in ("", "nan"):
                        points[float(r["x"])] = float(r["value"])
            xs = sorted(points)
            positive = positive or any(v > 0 for v in points.values())
            style = "--" if provider.endswith("[gqa]") else "-"
            ax.plot(xs, [points[x] for x in xs], style, marker="o", label=provider,
                    color=colors[provider.split("[")[0]])
        ax.set(xlabel=x_label, ylabel=f"{metric} ({unit})", title=metric)
        ax.grid(alpha=0.3)
        if not positive:
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
            continue
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        floor = ax.get_ylim()[0]
        for provider, x in ooms:
            ax.plot([x], [floor], "x", color=colors[provider.split("[")[0]], markersize=10,
                    clip_on=False)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{benchmark} on {device_name} (x on the floor = OOM)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def eager_vat(s_att, t_att, matches, layout, visual):
    """VAT from full attention probabilities (B, H, N, N): the materialising baseline.

    ``visual`` (B, N) bool, the same span in every sample; every row is a query row (no
    padding); each student layer's target is the mean of its window's teacher maps."""
    cols = visual[0].nonzero().squeeze(1)
    maps = lambda p: p.float().mean(1)[:, :, cols]  # noqa: E731
    terms = []
    for m in matches:
        with torch.no_grad():
            target = sum(maps(t_att[t]) for t in m.teacher_layers) / len(m.teacher_layers)
        terms.append(visual_map_loss(maps(s_att[m.student_layer]), target, layout))
    return torch.stack(terms).mean()
