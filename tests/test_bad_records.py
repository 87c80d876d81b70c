"""Bad training records and eval questions: counted by reason, shown under --quiet too, and
``data.on_bad_record: error`` stops before the first step (docs/stages.md#bad-records)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from compodistill.data import DataLossWarning  # noqa: E402
from compodistill.train.metrics import read_metrics  # noqa: E402

from _helpers import assert_one_line_error, write_tiny_pair  # noqa: E402

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_records")
    write_tiny_pair(root, num=6, student_layers=2, teacher_layers=2)
    data = root / "data"
    records = json.loads((data / "train.json").read_text())
    good = records[0]
    (data / "broken.png").write_bytes(b"not a png at all")
    records += [dict(good, id="gone", image="no-such.png"),
                dict(good, id="broken", image="broken.png"),
                {"id": "empty", "image": good["image"]}]
    (data / "bad.json").write_text(json.dumps(records))
    return root


def first_bad(root):
    n = len(json.loads((root / "data" / "bad.json").read_text()))
    return n, [f"record {n - 3} (id 'gone')", f"record {n - 2} (id 'broken')",
               f"record {n - 1} (id 'empty')"]


def config(root, out, **data):
    path = root / f"{out}.json"
    path.write_text(json.dumps({
        "student": str(root / "student"), "teacher": str(root / "teacher"),
        "output_dir": str(root / out), "cpu_threads": 1,
        "data": {"train_json": str(root / "data" / "bad.json"),
                 "image_folder": str(root / "data"), "max_length": 128, **data},
        "vat": {"student_layers": [1], "teacher_layers": [1]},
        "stages": [{"kind": "dpt", "max_steps": 2, "batch_size": 2}]}))
    return path


def test_train_counts_each_reason_in_summary_and_metrics(root, capsys):
    from compodistill.cli import main

    n, first = first_bad(root)
    with pytest.warns(DataLossWarning, match=f"skipped 3 of {n} records"):
        assert main(["train", "--config", str(config(root, "counted")), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "3 records skipped" in out.splitlines()[0], out  # the stage's summary line
    assert ("records_skipped: {bad record: 1, missing image: 1, unreadable image: 1} "
            f"(first: {'; '.join(first)})") in out
    rows = read_metrics(root / "counted" / "1-dpt" / "metrics.jsonl")
    assert rows and all(r["records_skipped"] == 3 for r in rows)
    assert rows[-1]["records_skipped_unreadable_image"] == 1
    assert rows[-1]["records_skipped_missing_image"] == 1


def test_on_bad_record_error_stops_before_the_first_step(root, capsys):
    from compodistill.cli import main

    code = main(["train", "--config", str(config(root, "stopped", on_bad_record="error")),
                 "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, first_bad(root)[1][0], "missing image",
                          "on_bad_record")
    assert not list((root / "stopped").rglob("metrics.jsonl"))


def test_quiet_never_hides_the_data_loss_warning(root):
    """In a fresh process, as a user runs it: --quiet silences libraries, not our warning."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}  # even a user's blanket ignore
    run = subprocess.run([sys.executable, "-m", "compodistill.cli", "train", "--config",
                          str(config(root, "quiet")), "--quiet"], capture_output=True,
                         text=True, env=env, cwd=Path(__file__).parent, timeout=600)
    assert run.returncode == 0, run.stderr
    n = first_bad(root)[0]
    assert f"DataLossWarning: LlavaDataset: skipped 3 of {n} records" in run.stderr, run.stderr
    assert "records_skipped: {bad record: 1, missing image: 1" in run.stdout


def test_eval_reports_what_it_could_not_score(root, capsys):
    from compodistill.cli import main

    data = root / "data"
    questions = json.loads((data / "vqa_eval.json").read_text())
    questions.append(dict(questions[0], id="lost", image="no-such.png"))
    (data / "vqa_bad.json").write_text(json.dumps(questions))
    out = root / "vqa.json"
    with pytest.warns(DataLossWarning, match="VQA eval: not scored: 1 of"):
        assert main(["eval", "vqa", "--model", str(root / "student"), "--data",
                     str(data / "vqa_bad.json"), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    n = len(questions)
    assert f"(n={n - 1})" in printed and f"not scored: 1 of {n} (missing image: 1" in printed
    result = json.loads(out.read_text())
    assert result["num_examples"] == n - 1 and len(result["predictions"]) == n - 1
    assert [u["id"] for u in result["unscored"]] == ["lost"]


def test_cr_eval_counts_an_unreadable_image(root):
    from compodistill.eval.cr import CRExample, evaluate_cr
    from compodistill.eval.cli import load_model_and_encoder

    model, encoder = load_model_and_encoder(str(root / "student"), None)
    good = json.loads((root / "data" / "train.json").read_text())[0]["image"]
    examples = [CRExample(str(root / "data" / good), "a red circle", "a blue square", id="ok"),
                CRExample(str(root / "data" / "broken.png"), "a", "b", id="bad")]
    with pytest.warns(DataLossWarning, match="CR eval: not scored: 1 of 2 \\(unreadable image"):
        results = evaluate_cr(model, examples, encoder, scorers=("loglik",), progress=False)
    assert results["loglik"].num_examples == 1
    assert results["loglik"].unscored[0]["id"] == "bad"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every image readable: no warning
        evaluate_cr(model, examples[:1], encoder, scorers=("loglik",), progress=False)


def test_cache_writer_counts_the_records_it_has_no_targets_for(root, capsys):
    from compodistill.cli import main

    path = config(root, "cache-run")
    cfg = json.loads(path.read_text())
    cfg["teacher"] = {"path": str(root / "teacher"), "cache": str(root / "cache"),
                      "shard_samples": 8, "batch_size": 4}
    path.write_text(json.dumps(cfg))
    with pytest.warns(DataLossWarning, match="skipped 3 of"):
        assert main(["teacher-cache", "--config", str(path), "--quiet"]) == 0
    assert "records_skipped: {bad record: 1, missing image: 1, unreadable image: 1}" in \
        capsys.readouterr().out
    index = json.loads((root / "cache" / "index.json").read_text())
    assert index["records_skipped"] == {"missing image": 1, "unreadable image": 1,
                                        "bad record": 1}
    assert index["first_skipped"] == first_bad(root)[1]
