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
    assert "colour   shape  left of" in out and "teacher " in out
    summary = json.loads(Path("runs/demo/summary.json").read_text())
    assert list(summary["phase_seconds"]) == list(PHASES)
    assert sum(summary["phase_seconds"].values()) <= summary["total_seconds"] + 0.5
    assert Path(summary["student_model"], "config.json").is_file()
    assert set(summary["scores"]["teacher"]) >= {"color", "shape", "left", "all"}
    assert summary["scores"]["teacher"]["n_per_type"] == 4

    # The README's next step: retrain from the demo's checkpoints with configs/demo.yaml.
    assert main(["train", "--config", str(CONFIG), "--quiet"]) == 0
    trained = capsys.readouterr().out
    assert [line.split(":")[0] for line in trained.splitlines()] == ["dpt", "dft", "sft",
                                                                   "records_skipped"]
    assert trained.splitlines()[-1] == "records_skipped: none"
    assert Path("runs/demo-train/3-sft/model/config.json").is_file()
