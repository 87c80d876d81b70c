"""Issue #36: a non-finite VAT or KD term is reported like a non-finite LM loss, by name."""
import warnings

import pytest
import torch

from compodistill.train.engine import Combined, nonfinite_terms

from _helpers import run_loop

pytest.importorskip("accelerate")


def test_nonfinite_terms_names_the_vat_layer_and_kd():
    nan = torch.tensor(float("nan"))
    terms = {"lm": torch.tensor(1.0), "kd": torch.tensor(float("inf")),
             "vat": Combined(nan, {"vat": nan, "vat_layer3": nan,
                                   "vat_layer5": torch.tensor(0.2)})}
    assert list(nonfinite_terms(terms)) == ["kd", "vat", "vat (student layer 3)"]
    assert nonfinite_terms({"lm": torch.tensor(1.0)}) == {}


def test_engine_warning_names_the_term(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_loop(tmp_path, 3, nan_calls=(2,))
    bad = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(bad) == 1 and "non-finite terms: lm" in bad[0], bad
