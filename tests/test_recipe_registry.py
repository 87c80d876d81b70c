"""A recipe defined outside the package: `register_recipe` alone makes the config accept it
(its terms, stage defaults and chain come from its own facts) and the trainer run it."""
import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402

from compodistill.train.config import ConfigError, config_from_dict  # noqa: E402
from compodistill.train.recipes import (Recipe, RecipeFacts, StageParts,  # noqa: E402
                                        recipe_facts, recipe_names, register_recipe,
                                        unregister_recipe)
from compodistill.train.stages import HiddenStates, lm_head, lm_loss  # noqa: E402
from compodistill.train.trainer import CompoDistillTrainer  # noqa: E402

from _helpers import write_tiny_pair  # noqa: E402

CALLS = []


class ShrinkRecipe(Recipe):
    """LM loss plus an L2 pull of the hidden states towards 0 (term "shrink")."""

    name = "shrink"
    facts = RecipeFacts(terms=("lm", "shrink"),
                        stage_defaults={"sft": dict(trainable="all",
                                                    weights=dict(lm=1.0, shrink=0.5))},
                        default_stages=("sft",))

    def stage_parts(self, trainer, student, params, stage, stage_dir) -> StageParts:
        def losses(prepared, batch):
            CALLS.append(stage.name)
            h = prepared(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))
            labels = batch["labels"][:, 1:]
            return {"lm": lm_loss(h[:, :-1], lm_head(student), labels),
                    "shrink": h.float().pow(2).mean()}

        return StageParts(HiddenStates(student), params, losses)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shrink")
    write_tiny_pair(root, num=6, num_eval=2, teacher=False)
    return root


@pytest.fixture
def shrink_registered():
    yield
    unregister_recipe("shrink")  # the registry is global: leave it as the other tests expect
    assert "shrink" not in recipe_names()


def test_a_registered_recipe_is_configured_and_trained(student_dir, shrink_registered):
    root = student_dir
    with pytest.raises(ConfigError, match="'shrink' is not a recipe"):
        config_from_dict({"recipe": "shrink"})
    register_recipe("shrink", ShrinkRecipe)
    assert "shrink" in recipe_names() and recipe_facts("shrink").terms == ("lm", "shrink")

    # The recipe's own facts: the weight "shrink" is legal, "vat" is not.
    with pytest.raises(ConfigError, match=r"no loss terms \['vat'\]"):
        config_from_dict({"recipe": "shrink", "stages": [{"kind": "sft",
                                                          "weights": {"vat": 1.0}}]})
    config = config_from_dict({
        "recipe": "shrink", "student": str(root / "student"), "output_dir": str(root / "run"),
        "data": {"train_json": str(root / "data" / "train.json"),
                 "image_folder": str(root / "data"), "max_length": 128},
        "stages": [{"kind": "sft", "max_steps": 3, "batch_size": 2}]})
    stage = config.stages[0]
    assert stage.trainable == "all" and stage.weights.as_dict()["shrink"] == 0.5
    assert config.taf is False
    results = CompoDistillTrainer(config, show_progress=False).run()
    assert [r.name for r in results] == ["sft"] and CALLS == ["sft"] * 3
    assert set(results[0].final_losses) == {"loss_lm", "loss_shrink", "loss"}
    final = results[0].final_losses
    assert final["loss"] == pytest.approx(final["loss_lm"] + 0.5 * final["loss_shrink"],
                                          rel=1e-5)
    assert (root / "run" / "1-sft" / "model" / "config.json").is_file()
    assert torch.isfinite(torch.tensor(final["loss"]))
    with pytest.raises(ValueError, match="built-in"):
        unregister_recipe("compodistill")
