"""Per-step metrics to JSONL and CSV (TensorBoard when installed) and loss-curve plots."""
from __future__ import annotations

import csv
import json
from pathlib import Path


STEP_KEY = "step"  # the optimizer step of a record: the x axis of every plot and TensorBoard


class MetricsLogger:
    """Appends one record per logged step to ``metrics.jsonl`` and ``metrics.csv``.

    The CSV header is the union of keys seen in the first record; later keys are kept in
    the JSONL (the complete record) and left out of the CSV rather than rewriting it.
    TensorBoard scalars (when installed) are written at the record's ``step``.
    """

    def __init__(self, directory: str | Path, enabled: bool = True, tensorboard=None):
        """``tensorboard``: a ``SummaryWriter``-like object (``add_scalar``, ``close``);
        default: one under ``directory/tensorboard`` when TensorBoard is installed."""
        self.directory = Path(directory)
        self.enabled = enabled
        self._csv_fields: list[str] | None = None
        self._tb = tensorboard
        if enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
        if enabled and tensorboard is None:
            try:  # optional dependency
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.directory / "tensorboard"))
            except Exception:
                self._tb = None

    @property
    def jsonl_path(self) -> Path:
        return self.directory / "metrics.jsonl"

    def truncate(self, step: int) -> None:
        """Keep only the records logged at or before ``step`` (a resumed run redoes the rest)."""
        if not self.enabled:
            return
        records = [r for r in read_metrics(self.jsonl_path) if r[STEP_KEY] <= step]
        for name in ("metrics.jsonl", "metrics.csv"):
            (self.directory / name).unlink(missing_ok=True)
        self._csv_fields = None
        for record in records:
            self._write(record, tensorboard=False)  # TensorBoard already has these

    def log(self, record: dict) -> None:
        if self.enabled:
            self._write(record, tensorboard=True)

    def _write(self, record: dict, tensorboard: bool) -> None:
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        csv_path = self.directory / "metrics.csv"
        if self._csv_fields is None:
            self._csv_fields = (_read_header(csv_path) if csv_path.exists()
                                else list(record.keys()))
            if not csv_path.exists():
                with open(csv_path, "w", newline="") as f:
                    csv.writer(f).writerow(self._csv_fields)
        with open(csv_path, "a", newline="") as f:
            csv.writer(f).writerow([record.get(k, "") for k in self._csv_fields])
        if tensorboard and self._tb is not None:
            step = record[STEP_KEY]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != STEP_KEY:
                    self._tb.add_scalar(f"{record.get('stage', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _read_header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


LAYER_PREFIX = "loss_vat_layer"  # per-layer VAT alignment, one series per matched layer


def _layer_of(key: str) -> int:
    tail = key[len(LAYER_PREFIX):]
    return int(tail) if tail.isdigit() else -1


def plot_loss_curves(records: list[dict], out_png: str | Path, title: str = "") -> Path | None:
    """Plot every ``loss*`` series against the step; returns the PNG path (None if no data).

    The per-layer VAT alignment series (``loss_vat_layer<l>``, one per matched student layer)
    get a second panel of their own.
    """
    keys = sorted({k for r in records for k, v in r.items()
                   if k.startswith("loss") and isinstance(v, (int, float))})
    if not records or not keys:
        return None
    layer_keys = sorted((k for k in keys if k.startswith(LAYER_PREFIX)), key=_layer_of)
    keys = [k for k in keys if k not in layer_keys]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(keys, "loss")] if keys else []
    if layer_keys:
        panels.append((layer_keys, "VAT loss per matched student layer"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 4 * len(panels)), squeeze=False)
    for ax, (series, ylabel) in zip(axes[:, 0], panels):
        for key in series:
            points = [(r["step"], r[key]) for r in records
                      if isinstance(r.get(key), (int, float))]
            label = (f"student layer {_layer_of(key)}" if key.startswith(LAYER_PREFIX)
                     else key)
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, marker=".")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0, 0].set_title(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
