"""``compodistill inspect``: see where a student's visual attention departs from its teacher's.

For each sample the teacher and the student run once inside an
:class:`~compodistill.hf.AttentionDistiller` capture (the fused ``"compodistill"`` attention: no
``output_attentions``, no N×N matrix). For every matched layer pair the student map and the
teacher target (the mean of the matched teacher window, as in training) are averaged over the
chosen query rows (the answer tokens, ``labels != -100``, or every text row), put back on each
image's patch grid and drawn over the image, side by side with their difference. The title
holds the layer pair's alignment: the configured VAT loss (what training minimises) and the
flat cosine similarity of the two maps.

Over all samples, ``summary.csv`` has one row per (sample, student layer) and ``summary.png``
plots the loss and cosine per student layer (mean and interquartile range across samples), with
the matched teacher windows marked: the misalignment plot for the user's pair.

The patch grid comes from the model config: vision ``image_size`` / ``patch_size`` and
``image_seq_length`` (a leading CLS token, when the tokens per image exceed the patches by one,
is left off the grid). Definitions: docs/inspect.md.
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["QUERIES", "PatchGrid", "InspectResult", "patch_grid", "image_grids",
           "inspect_alignment", "run_inspect", "add_arguments", "run"]

QUERIES = ("answer", "text")
CSV_FIELDS = ("sample", "sample_id", "student_layer", "teacher_layers", "loss", "cosine")


@dataclass(frozen=True)
class PatchGrid:
    """How one image's tokens lie on its patch grid: ``lead`` tokens (e.g. CLS) come first and
    are not drawn, then ``rows × cols`` patches in row-major order."""

    rows: int
    cols: int
    lead: int = 0

    @property
    def tokens(self) -> int:
        return self.lead + self.rows * self.cols


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def patch_grid(config) -> PatchGrid:
    """The :class:`PatchGrid` of a LLaVA config (``vision_config.image_size`` / ``patch_size``,
    ``image_seq_length`` image tokens per image)."""
    vision = getattr(config, "vision_config", None)
    tokens = getattr(config, "image_seq_length", None)
    if vision is None or tokens is None:
        raise ValueError("the model config has no vision_config / image_seq_length: inspect "
                         "needs a LLaVA-style model")
    (h, w), (ph, pw) = _pair(vision.image_size), _pair(vision.patch_size)
    rows, cols = h // ph, w // pw
    lead = int(tokens) - rows * cols
    if lead not in (0, 1):
        raise ValueError(f"image_seq_length={tokens} does not fit the {rows}x{cols} patch grid "
                         f"of image_size={vision.image_size}, patch_size={vision.patch_size}")
    return PatchGrid(rows, cols, lead)


def image_grids(values: torch.Tensor, grids: Sequence[PatchGrid]) -> list[torch.Tensor]:
    """Split per-visual-token values (V,) into one (rows, cols) tensor per image, in order.

    ``values`` follow the visual columns of a map (image tokens in sequence order), so image
    ``i`` owns the next ``grids[i].tokens`` of them; its lead tokens are dropped.
    """
    need = sum(g.tokens for g in grids)
    if values.dim() != 1 or values.numel() != need:
        raise ValueError(f"got {tuple(values.shape)} visual values for {len(grids)} images of "
                         f"{[g.tokens for g in grids]} tokens ({need} in all)")
    out, start = [], 0
    for g in grids:
        block = values[start + g.lead: start + g.tokens]
        out.append(block.reshape(g.rows, g.cols))
        start += g.tokens
    return out


@dataclass
class InspectResult:
    """What :func:`inspect_alignment` measured and wrote.

    ``rows``: one dict per (sample, matched layer) with :data:`CSV_FIELDS`. ``cells``:
    ``{(sample, student_layer): {"student": [grid per image], "teacher": [...]}}``, the values
    drawn (mean over the query rows of each map, on each image's patch grid). ``skipped``: one
    line per sample left out (e.g. no image).
    """

    rows: list = field(default_factory=list)
    cells: dict = field(default_factory=dict)
    figures: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    summary_csv: Path | None = None
    summary_png: Path | None = None
    seconds: float = 0.0


def _query_rows(labels: torch.Tensor, query: str):
    """The capture's ``query``: the answer-token mask, or ``"text"``; None for no answer."""
    if query == "text":
        return "text"
    rows = labels != -100
    return rows if bool(rows.any()) else None


def _row_mean(maps: torch.Tensor, layout) -> torch.Tensor:
    """(1, Qmax, Vmax) map -> (V,) mean over the real query rows of sample 0."""
    q, v = int(layout.query_count[0]), int(layout.visual_count[0])
    return maps[0, :q, :v].float().mean(0)


def _load_pixels_for_display(paths, size):
    from PIL import Image

    from ..data.images import open_image

    h, w = _pair(size)
    return [open_image(p).resize((w, h), Image.BICUBIC) for p in paths]


def _layer_figure(path: Path, images, student_grids, teacher_grids, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.6 * n + 0.6), squeeze=False)
    top = max(float(torch.stack([g.max() for g in student_grids + teacher_grids]).max()), 1e-12)
    for i, (image, s, t) in enumerate(zip(images, student_grids, teacher_grids)):
        w, h = image.size
        extent = (0, w, h, 0)
        diff = (s - t).numpy()
        lim = max(float(np.abs(diff).max()), 1e-12)
        panels = [("image", None, None), ("teacher", t.numpy(), "magma"),
                  ("student", s.numpy(), "magma"), ("student - teacher", diff, "RdBu_r")]
        for ax, (name, values, cmap) in zip(axes[i], panels):
            ax.imshow(image, extent=extent)
            if values is not None:
                lo, hi = (-lim, lim) if cmap == "RdBu_r" else (0.0, top)
                im = ax.imshow(values, extent=extent, cmap=cmap, vmin=lo, vmax=hi, alpha=0.65,
                               interpolation="nearest")
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(f"{name}" + (f" (image {i + 1})" if n > 1 else ""), fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(fig, title, path, fontsize=9)


def _save(fig, title: str, path: Path, fontsize: int) -> Path:
    """Title, lay out, write (small PNGs: dpi 72) and free a figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def _window(layers: Sequence[int]) -> str:
    layers = list(layers)
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(str(t) for t in layers)


def _summary_figure(path: Path, rows: list, matches, loss_name: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = [m.student_layer for m in matches]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8),
                             gridspec_kw={"width_ratios": [1.2, 1.2, 1.0]})
    for ax, key, label in ((axes[0], "loss", f"VAT loss ({loss_name})"),
                           (axes[1], "cosine", "cosine similarity")):
        stats = []
        for layer in layers:
            vals = np.array([r[key] for r in rows if r["student_layer"] == layer], dtype=float)
            stats.append((vals.mean(), *np.percentile(vals, [25, 75])))
        mean, q1, q3 = (np.array(s) for s in zip(*stats))
        ax.fill_between(layers, q1, q3, alpha=0.25, label="interquartile range")
        ax.plot(layers, mean, marker="o", label="mean over samples")
        for x, y, m in zip(layers, mean, matches):
            ax.annotate(f"T{_window(m.teacher_layers)}", (x, y), textcoords="offset points",
                        xytext=(0, 7), ha="center", fontsize=8)
        ax.set_xticks(layers)
        ax.set_xlabel("student layer (T: matched teacher layers)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    for m in matches:
        ts = list(m.teacher_layers)
        ax.plot(ts, [m.student_layer] * len(ts), marker="s", linewidth=4, alpha=0.7)
    ax.set_yticks(layers)
    ax.set_xlabel("teacher layer")
    ax.set_ylabel("student layer")
    ax.set_title("matched teacher windows", fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, title, path, fontsize=10)


def _check_pair(student, teacher) -> PatchGrid:
    grid = patch_grid(student.config)
    if patch_grid(teacher.config) != grid:
        raise ValueError(f"teacher and student see images on different patch grids "
                         f"({patch_grid(teacher.config)} vs {grid}); inspect compares them "
                         f"token for token")
    s_tok, t_tok = student.config.image_token_id, teacher.config.image_token_id
    if s_tok != t_tok:
        raise ValueError(f"teacher image_token_id {t_tok} differs from the student's {s_tok}: "
                         f"inspect feeds both the same token ids")
    return grid


def inspect_alignment(student, teacher, encoder, records, out, *, samples: int = 8,
                      layers: Sequence[int] | None = None,
                      teacher_layers: Sequence[int] | None = None, query: str = "answer",
                      preset: str = "all", matching: str = "group", loss: str = "cosine",
                      cosine: str = "flat", image_folder: str | None = None,
                      figures: bool = True, progress: bool = True,
                      log=None) -> InspectResult:
    """Per-layer teacher/student visual-attention alignment of the first ``samples`` records.

    Args:
        student, teacher: loaded LLaVA-style models (same image token and patch grid); their
            language models are switched to the ``"compodistill"`` attention.
        encoder: the student's :class:`~compodistill.data.ConversationEncoder` (both models
            get the same token ids).
        records: a LLaVA ``.json`` / ``.jsonl`` path or a list of records.
        out: output folder: ``sample-<i>/layer-<l>.png``, ``summary.csv``, ``summary.png``.
        layers, teacher_layers, preset, matching: which layers are compared
            (:func:`compodistill.match_layers`; default every student layer, group windows).
        query: ``"answer"`` (rows with ``labels != -100``) or ``"text"`` (every text row).
        loss, cosine: the VAT loss reported (:func:`compodistill.visual_map_loss`).
        log: where one-line notes (skipped samples) go; default stderr.

    Raises:
        ValueError: a bad option, a malformed record or missing image file, or no sample with
            an image among the first ``samples``.
    """
    import time

    from ..data.records import parse_record, read_records
    from ..eval.common import progress_bar
    from ..hf import AttentionDistiller
    from ..visual_attention import visual_map_loss

    if query not in QUERIES:
        raise ValueError(f"--query must be one of {QUERIES}, got {query!r}")
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    log = sys.stderr if log is None else log
    start = time.perf_counter()
    grid = _check_pair(student, teacher)
    distiller = AttentionDistiller(student, teacher, student_layers=layers,
                                   teacher_layers=teacher_layers, preset=preset,
                                   matching=matching, loss=loss, cosine=cosine)
    options = distiller.loss_options
    items, problems = read_records(records)
    if problems:
        raise ValueError(problems[0].message)
    items = items[:samples]
    if not items:
        raise ValueError("--data: the data file holds no records")
    out = Path(out)
    result = InspectResult()
    device = next(student.parameters()).device
    student.eval()
    teacher.eval()
    for index, (record, where) in enumerate(progress_bar(items, "inspect", progress)):
        messages, paths = parse_record(record, where, image_folder, encoder.image_token)
        name = record.get("id", index) if isinstance(record, dict) else index
        if not paths:
            note = f"{where} (id {name!r}) has no image: skipped (inspect compares attention " \
                   f"on image tokens)"
            result.skipped.append(note)
            continue
        enc = encoder.encode(messages)
        ids = torch.tensor([enc["input_ids"]], device=device)
        labels = torch.tensor([enc["labels"]], device=device)
        mask = torch.ones_like(ids)
        pixels = encoder.load_images(paths).to(device)
        rows = _query_rows(labels, query)
        if rows is None:
            note = f"{where} (id {name!r}) has no answer tokens: skipped"
            result.skipped.append(note)
            continue
        with torch.no_grad(), distiller.capture(ids, attention_mask=mask, query=rows) as cap:
            for model in (teacher, student):
                model.model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                            use_cache=False)
        layout = cap.layout
        grids = [grid] * len(enc["image_blocks"])
        images = _load_pixels_for_display(paths, student.config.vision_config.image_size) \
            if figures else None
        for match, s_map, t_map in cap.layer_maps():
            value = float(visual_map_loss(s_map, t_map, layout, **options))
            cos = 1.0 - float(visual_map_loss(s_map, t_map, layout, loss="cosine",
                                              cosine="flat"))
            s_cells = image_grids(_row_mean(s_map, layout).cpu(), grids)
            t_cells = image_grids(_row_mean(t_map, layout).cpu(), grids)
            result.cells[(index, match.student_layer)] = {"student": s_cells, "teacher": t_cells}
            # Adaptive matching compares against the one teacher layer it picked.
            chosen = cap.choices.get(match.student_layer)
            teachers = [chosen] if chosen is not None else list(match.teacher_layers)
            window = " ".join(str(t) for t in teachers)
            result.rows.append(dict(sample=index, sample_id=name,
                                    student_layer=match.student_layer, teacher_layers=window,
                                    loss=value, cosine=cos))
            if figures:
                title = (f"sample {name}: student layer {match.student_layer} vs teacher "
                         f"layers {_window(teachers)} ({query} rows)\n"
                         f"VAT {options['loss']} loss {value:.4f}   cosine {cos:.4f}")
                result.figures.append(_layer_figure(
                    out / f"sample-{index:03d}" / f"layer-{match.student_layer:02d}.png",
                    images, s_cells, t_cells, title))
        cap.loss()  # frees the targets
    if not result.rows:
        raise ValueError(f"none of the first {len(items)} samples has an image (and answer "
                         f"tokens): nothing to inspect; {result.skipped[0]}")
    for note in result.skipped:  # after the progress bar, one line each
        print(f"compodistill inspect: {note}", file=log)
    out.mkdir(parents=True, exist_ok=True)
    result.summary_csv = out / "summary.csv"
    with open(result.summary_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(result.rows)
    if figures:
        n = len({r["sample"] for r in result.rows})
        result.summary_png = _summary_figure(
            out / "summary.png", result.rows, distiller.matches, options["loss"],
            f"teacher vs student visual attention over {n} sample(s), {query} rows")
    result.seconds = time.perf_counter() - start
    return result


def run_inspect(teacher: str, student: str, data: str, out: str, *,
                image_folder: str | None = None, device: str | None = None,
                **options) -> InspectResult:
    """Load a saved teacher and student (``save_pretrained`` folders; the student's holds the
    tokenizer) and run :func:`inspect_alignment` on ``data``."""
    import os

    for flag, path in (("--teacher", teacher), ("--student", student)):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{flag}: model folder not found: {path}")
    if not os.path.isfile(data):
        raise FileNotFoundError(f"--data: data file not found: {data}")
    if image_folder is not None and not os.path.isdir(image_folder):
        raise FileNotFoundError(f"--image-folder: folder not found: {image_folder}")
    from ..eval.cli import load_model_and_encoder
    from ..hf import load_student

    student_model, encoder = load_model_and_encoder(student)
    teacher_model = load_student(teacher).eval()
    if device:
        student_model.to(device)
        teacher_model.to(device)
    folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(data))
    return inspect_alignment(student_model, teacher_model, encoder, data, out,
                             image_folder=folder, **options)


def add_arguments(p) -> None:
    """The options of ``compodistill inspect``."""
    from ..matching import MODES, PRESETS
    from ..visual_attention import COSINE_MODES, LOSSES

    p.add_argument("--teacher", required=True, help="teacher model folder (save_pretrained)")
    p.add_argument("--student", required=True,
                   help="student model folder (save_pretrained, with its tokenizer)")
    p.add_argument("--data", required=True, help="LLaVA-format .json / .jsonl records")
    p.add_argument("--image-folder", default=None,
                   help="folder the records' image paths are relative to (default: the data "
                        "file's folder)")
    p.add_argument("--samples", type=int, default=8,
                   help="inspect the first K records (default 8)")
    p.add_argument("--layers", nargs="+", type=int, default=None,
                   help="student layers to compare, 0-based (default: every layer)")
    p.add_argument("--teacher-layers", nargs="+", type=int, default=None,
                   help="teacher layers to match them with (default: from --preset)")
    p.add_argument("--query", choices=QUERIES, default="answer",
                   help="query rows: the answer tokens (labels != -100, default) or every "
                        "text row")
    p.add_argument("--preset", choices=PRESETS, default="all",
                   help="depth preset for the sides not given explicitly (default all)")
    p.add_argument("--matching", choices=MODES, default="group",
                   help="layer matching (default group: each student layer against the mean "
                        "of a teacher window)")
    p.add_argument("--loss", choices=LOSSES, default="cosine",
                   help="VAT loss reported per layer (default cosine)")
    p.add_argument("--cosine", choices=COSINE_MODES, default="flat",
                   help="cosine variant of the loss (default flat)")
    p.add_argument("--device", default=None, help="e.g. cuda:0 (default: cpu)")
    p.add_argument("--out", required=True, help="output folder for the PNGs and summary.csv")


def run(args) -> int:
    """``compodistill inspect``: print where the figures went and the per-layer summary."""
    result = run_inspect(args.teacher, args.student, args.data, args.out,
                         image_folder=args.image_folder, device=args.device,
                         samples=args.samples, layers=args.layers,
                         teacher_layers=args.teacher_layers, query=args.query,
                         preset=args.preset, matching=args.matching, loss=args.loss,
                         cosine=args.cosine, progress=not args.quiet)
    by_layer: dict = {}
    for r in result.rows:
        by_layer.setdefault((r["student_layer"], r["teacher_layers"]), []).append(r)
    print(f"{'student layer':>13}  {'teacher layers':<14}  {args.loss + ' loss':>12}  "
          f"{'cosine':>7}")
    for (layer, window), rows in sorted(by_layer.items()):
        loss = sum(r["loss"] for r in rows) / len(rows)
        cos = sum(r["cosine"] for r in rows) / len(rows)
        print(f"{layer:>13}  {window:<14}  {loss:>12.4f}  {cos:>7.4f}")
    print(f"{len(result.figures)} figures, summary in {result.summary_csv} and "
          f"{result.summary_png} ({result.seconds:.1f} s)")
    return 0
