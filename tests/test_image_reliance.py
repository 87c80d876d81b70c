"""image_reliance: each stage starts by measuring how much the LM loss rises with the images
replaced; a model blind to its images gets a one-line warning (docs/stages.md#image-reliance)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from compodistill.train.config import ConfigError, config_from_dict  # noqa: E402
from compodistill.train.image_reliance import (BlindModelWarning, Reliance,  # noqa: E402
                                               replaced_images)
from compodistill.train.metrics import read_metrics  # noqa: E402
from compodistill.train.trainer import CompoDistillTrainer  # noqa: E402

from _helpers import write_tiny_pair  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("image_reliance")
    write_tiny_pair(root, num=6, student_layers=2, teacher_layers=2)
    # The planted blind student: its connector's output layer zeroed, so every image
    # reaches the language model as the same zero vectors.
    from compodistill.hf.llava import load_student

    blind = load_student(str(root / "student"))
    with torch.no_grad():
        blind.model.multi_modal_projector.linear_2.weight.zero_()
        blind.model.multi_modal_projector.linear_2.bias.zero_()
    blind.save_pretrained(root / "blind")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(root / "student")).save_pretrained(root / "blind")
    return root


def config(root, student, out, **extra):
    return config_from_dict({
        "student": str(root / student), "teacher": str(root / "teacher"),
        "output_dir": str(root / out), "cpu_threads": 1, "taf": False,
        "data": {"train_json": str(root / "data" / "train.json"),
                 "image_folder": str(root / "data"), "max_length": 128},
        "vat": {"student_layers": [1], "teacher_layers": [1]},
        "stages": [{"kind": "dpt", "max_steps": 2, "batch_size": 2, "trainable": "connector"}],
        **extra})


def test_a_blind_student_is_warned_about(root):
    with pytest.warns(BlindModelWarning, match="stage dpt: the student does not depend on its "
                                               "images") as caught:
        (result,) = CompoDistillTrainer(config(root, "blind", "blind-run"),
                                            show_progress=False).run()
    assert len(caught) == 1  # the teacher looks at its images: no warning for it
    assert result.image_reliance["student"] == 0.0
    assert result.image_reliance["teacher"] != 0.0
    rows = read_metrics(root / "blind-run" / "1-dpt" / "metrics.jsonl")
    assert rows[0]["image_reliance_student"] == 0.0 and "image_reliance_teacher" in rows[0]


def test_a_normal_student_is_not(root):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BlindModelWarning)
        (result,) = CompoDistillTrainer(config(root, "student", "normal-run"),
                                            show_progress=False).run()
    assert result.image_reliance["student"] != 0.0
    assert set(result.image_reliance) == {"student", "teacher"}


def test_the_stage_line_shows_it_and_zero_batches_turn_it_off(root, capsys, tmp_path):
    from compodistill.cli import main

    cfg = {"student": str(root / "student"), "teacher": str(root / "teacher"),
           "output_dir": str(tmp_path / "cli"), "cpu_threads": 1,
           "data": {"train_json": str(root / "data" / "train.json"),
                    "image_folder": str(root / "data"), "max_length": 128},
           "vat": {"student_layers": [1], "teacher_layers": [1]},
           "stages": [{"kind": "sft", "max_steps": 1, "batch_size": 2, "lora_r": 4,
                       "lora_alpha": 8}]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(path), "--quiet"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "image reliance student " in line and "teacher" not in line.split("final")[0]
    path.write_text(json.dumps({**cfg, "image_reliance_batches": 0,
                                "output_dir": str(tmp_path / "off")}))
    assert main(["train", "--config", str(path), "--quiet"]) == 0
    assert "image reliance" not in capsys.readouterr().out
    with pytest.raises(ConfigError, match="image_reliance_batches: must be >= 0"):
        config_from_dict({**cfg, "image_reliance_batches": -1})


def test_replaced_images_per_layout():
    llava = {"pixel_values": torch.arange(3.0).view(3, 1, 1, 1)}
    assert replaced_images(llava)["pixel_values"].flatten().tolist() == [2.0, 0.0, 1.0]
    one = {"pixel_values": torch.tensor([[[[1.0, 3.0]]]])}
    assert replaced_images(one)["pixel_values"].flatten().tolist() == [2.0, 2.0]
    grid = torch.tensor([[1, 2, 2], [1, 2, 2]])
    qwen = {"pixel_values": torch.arange(8.0).view(8, 1), "image_grid_thw": grid}
    assert replaced_images(qwen)["pixel_values"].flatten().tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    uneven = {"pixel_values": torch.arange(6.0).view(6, 1),
              "image_grid_thw": torch.tensor([[1, 2, 2], [1, 1, 2]])}
    assert replaced_images(uneven)["pixel_values"].flatten().tolist() == [2.5] * 6
    assert replaced_images({"pixel_values": None}) is None
    assert Reliance(2.0, 2.0).blind and not Reliance(2.0, 2.001).blind
