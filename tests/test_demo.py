"""`compodistill demo` end to end at a tiny size: one line per phase with its time, the total,
and the checkpoints that `configs/demo.yaml` trains from."""
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
from compodistill.cli import main  # noqa: E402
from compodistill.apps.demo import PHASES  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
TINY = ["--num-images", "24", "--eval-images", "4", "--teacher-steps", "4",
        "--student-warmup-steps", "2",
        "--dpt-steps", "2", "--dft-steps", "2", "--sft-steps", "2", "--batch-size", "4"]


def test_demo_shows_every_phase_and_feeds_the_demo_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", *TINY]) == 0
    out = capsys.readouterr().out
    for i, phase in enumerate(PHASES, 1):
        assert f"[{i}/{len(PHASES)}] {phase}:" in out, out
        assert f"      {phase} done in " in out, out
    assert "; total " in out.splitlines()[-2] or "; total " in out
    # Every phase but the last ends with an estimate of the time left.
    assert out.count(" s left)") == len(PHASES) - 1, out
    assert "colour         shape       left of" in out and "teacher " in out
    assert "CompoDistill - LM only" in out and "paired standard error on all questions" in out
    summary = json.loads(Path("runs/demo/summary.json").read_text())
    assert list(summary["phase_seconds"]) == list(PHASES)
    assert sum(summary["phase_seconds"].values()) <= summary["total_seconds"] + 0.5
    assert Path(summary["student_model"], "config.json").is_file()
    assert set(summary["scores"]["teacher"]) >= {"color", "shape", "left", "all"}
    assert summary["scores"]["teacher"]["n_per_type"] == 4
    assert set(summary["scores"]) == {"teacher", "student (warm-up only)", "student (LM only)",
                                      "student (CompoDistill)"}
    assert set(summary["gain"]["all"]) == {"diff", "se", "n"}
    assert json.loads(Path("runs/demo/teacher-warmup/1-teacher/model/provenance.json")
                      .read_text())["steps"] == 4
    # The two students: the same stages and steps; only CompoDistill's has KD and VAT.
    stages = {(s["student"], s["stage"]): s for s in summary["stages"]}
    assert [k[1] for k in stages] == ["dpt", "dft", "sft"] * 2
    assert all("loss_kd" not in s and "loss_vat" not in s for (who, _), s in stages.items()
               if who == "student (LM only)")
    assert "loss_vat" in stages["student (CompoDistill)", "dft"]

    # The README's next step: retrain from the demo's checkpoints with configs/demo.yaml.
    assert main(["train", "--config", str(CONFIG), "--quiet"]) == 0
    trained = capsys.readouterr().out
    assert [line.split(":")[0] for line in trained.splitlines()] == ["dpt", "dft", "sft",
                                                                   "records_skipped"]
    assert trained.splitlines()[-1] == "records_skipped: none"
    assert Path("runs/demo-train/3-sft/model/config.json").is_file()


def test_demo_with_the_shipped_teacher_scores_it_and_distils_from_it(tmp_path, capsys):
    """The default: the shipped pretrained teacher, loaded and scored (no teacher training);
    the distilled student beats the LM-only one is the full-size claim (README), not this
    tiny one's."""
    from compodistill.apps.demo import SHIPPED_TEACHER, format_summary, run_demo

    tiny = dict(num_images=24, eval_images=6, student_warmup_steps=2, dpt_steps=2,
                dft_steps=2, sft_steps=2, batch_size=4)
    summary = run_demo(tmp_path / "demo", progress=False, **tiny)
    assert summary["teacher_shipped"] and summary["phase_seconds"]["teacher"] < 30
    # The shipped teacher answers the grid task (the full-size run: 95% of 600 questions).
    assert summary["scores"]["teacher"]["all"] >= 0.7
    provenance = json.loads((SHIPPED_TEACHER / "provenance.json").read_text())
    assert provenance["command"].startswith("compodistill demo --teacher-steps 3000")
    assert list(summary["vat_layers"]) == [[1], [1]]  # its sharp layer (share >= 0.6)
    text = format_summary(summary)
    assert "student (CompoDistill)" in text and "± " in text


def test_demo_options_are_checked():
    from compodistill.apps.demo import run_demo

    with pytest.raises(ValueError, match="--dft-steps must be >= 1, got 0"):
        run_demo(dft_steps=0)
    with pytest.raises(ValueError, match="--teacher-steps must be >= 0, got -1"):
        run_demo(teacher_steps=-1)
