"""Every config value is checked when the file loads: the error names the key path, the value
and what is allowed, before any model is loaded or any folder is written."""
import json

import pytest

from compodistill import matching
from compodistill.logit_kd import from_logits as logit_losses
from compodistill.visual_attention import map_losses
from compodistill.visual_attention.layout import QUERY_MODES
from compodistill.train import config as cfg
from compodistill.train.config import ConfigError, config_from_dict, load_config

BAD = [
    ({"kd": {"loss": "kld"}}, r"kd\.loss: 'kld' is not one of 'kl', 'reverse_kl', 'jsd'"),
    ({"vat": {"loss": "cosin"}}, r"vat\.loss: 'cosin' is not one of 'cosine'"),
    ({"vat": {"preset": "middle"}}, r"vat\.preset: 'middle' is not one of 'all', 'early'"),
    ({"vat": {"matching": "groups"}}, r"vat\.matching: 'groups' is not one of 'group'"),
    ({"vat": {"cosine": "pool"}}, r"vat\.cosine: 'pool' is not one of 'flat', 'row', 'pooled'"),
    ({"vat": {"layer_reduction": "avg"}}, r"vat\.layer_reduction: 'avg'"),
    ({"kd": {"positions": "resp"}}, r"kd\.positions: 'resp' is not one of 'response'"),
    ({"kd": {"temperature": 0}}, r"kd\.temperature: must be > 0"),
    ({"data": {"on_bad_record": "ignore"}},
     r"data\.on_bad_record: 'ignore' is not one of 'skip', 'error'"),
    ({"data": {"on_error": "skip"}}, r"unknown keys \['on_error'\].*on_error is now on_bad_record"),
    ({"stages": [{"kind": "dpt", "lr": "fast"}]},
     r"stages\[0\]\.lr: expected a number, got 'fast' \(str\)"),
    ({"stages": [{"kind": "dpt"}, {"kind": "dft", "batch_size": 0}]},
     r"stages\[1\]\.batch_size: must be positive, got 0"),
    ({"stages": [{"kind": "dpt", "scheduler": "step"}]}, r"stages\[0\]\.scheduler: 'step'"),
    ({"stages": [{"kind": "dpt", "weights": {"kd": -1}}]},
     r"stages\[0\]\.weights\.kd: a loss weight must be >= 0"),
    ({"stages": [{"kind": "rl"}]}, r"stages\[0\]\.kind: 'rl' is not a stage kind"),
    ({"stages": [{"lr": 1e-4}]}, r"stages\[0\]\.kind: is required"),
    ({"seed": 1.5}, r"seed: expected an integer, got 1\.5"),
    ({"gradient_checkpointing": "yes"}, r"gradient_checkpointing: expected true or false"),
    ({"mixed_precision": "fp8"}, r"mixed_precision: 'fp8' is not one of 'no', 'fp16', 'bf16'"),
    ({"recipe": "distill"}, r"recipe: 'distill' is not a recipe"),
    ({"kd": "kl"}, r"kd: expected a mapping"),
    ({"vat": {"student_layers": [1, "x"]}}, r"vat\.student_layers: expected a list of"),
]


@pytest.mark.parametrize("raw,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_values_are_named_at_load_time(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_bad_value_in_a_file_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("kd:\n  loss: kld\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: kd\.loss: 'kld' is not one of"):
        load_config(path)
    path.write_text("kd: [unclosed\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: cannot be parsed"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path):
    # YAML 1.1 reads `2e-4` as a string; users write it anyway.
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"stages": [{"kind": "dpt", "lr": "2e-4"}]}))
    assert load_config(path).stages[0].lr == pytest.approx(2e-4)


def test_config_choices_equal_the_losses_choices():
    # The config keeps its own copies so that loading it stays cheap; they must not drift.
    assert cfg.KD_LOSSES == logit_losses.LOSSES
    assert cfg.KD_POSITIONS == logit_losses.POSITIONS
    assert cfg.VAT_LOSSES == map_losses.LOSSES
    assert cfg.VAT_COSINE == map_losses.COSINE_MODES
    assert cfg.VAT_DISTRIBUTIONS == map_losses.DISTRIBUTIONS
    assert cfg.VAT_MATCHING == matching.MODES
    assert cfg.VAT_PRESETS == matching.PRESETS
    # plus "response", which the trainer makes from each batch's labels (a row mask)
    assert cfg.VAT_QUERIES == (*QUERY_MODES, "response")


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")):
        load_config(path)
