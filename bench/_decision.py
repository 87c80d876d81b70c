"""The decision rule of the grounded experiment, fixed before the run (docs/experiment.md,
"Protocol"). Pure functions over per-seed numbers; bench/experiment_grounded.py feeds them.

- ``holds``: KD+VAT beats KD *and* the shuffled control by >= 5 points, each with a
  one-sided Welch p < 0.05.
- ``null`` (a clean null) needs all of: the teacher passes both gates; the oracle arm beats
  KD by >= 10 points with p < 0.05; KD+VAT's answer-row share on the target cell in the
  distilled student layer exceeds KD's by >= 0.15; the upper end of the 90% interval of
  KD+VAT − KD is below +5 points.
- anything else is ``inconclusive``, with the conditions that failed and what would decide it.

Secondary contrasts (per question type, TAF's share, VAT given TAF) are Holm-corrected.
"""
from __future__ import annotations

import math
import statistics
from typing import Mapping, Sequence

from bench._stats import holm, seeds_for_power, welch

__all__ = ["MIN_GAIN", "ORACLE_GAIN", "SHARE_GAIN", "ALPHA", "SECONDARY", "decide",
           "secondary_contrasts"]

MIN_GAIN = 0.05     # the effect the claim is about: 5 points on the primary endpoint
ORACLE_GAIN = 0.10  # the positive control must show the design can find a gain at all
SHARE_GAIN = 0.15   # VAT must move the student's attention (manipulation check)
ALPHA = 0.05
# name -> (arm a, arm b, endpoint): one-sided "a > b", Holm-corrected together
SECONDARY = {
    "vat_color": ("kd+vat", "kd", "q_color"),
    "vat_shape": ("kd+vat", "kd", "q_shape"),
    "vat_left": ("kd+vat", "kd", "q_left"),
    "taf": ("kd+taf", "kd", "q_all"),
    "vat_given_taf": ("kd+taf+vat", "kd+taf", "q_all"),
}


def _mean(values: Sequence[float]) -> float:
    return statistics.mean(values) if values else math.nan


def decide(primary: Mapping[str, Sequence[float]], share: Mapping[str, Sequence[float]], *,
           teacher_accuracy_ok: bool, teacher_attention_ok: bool) -> dict:
    """The verdict from per-seed values.

    Args:
        primary: arm -> per-seed held-out accuracy on colour + shape + left-of questions
            (needs ``kd``, ``kd+vat``, ``kd+vat-shuffled``; ``kd+vat-oracle`` for a null).
        share: arm -> per-seed answer-row share on the target cell in the distilled student
            layer (``kd`` and ``kd+vat``).
        teacher_accuracy_ok, teacher_attention_ok: the two teacher gates.

    Returns ``verdict`` (``"holds"``, ``"null"``, ``"inconclusive"`` or ``"not decidable"``),
    the contrasts, ``conditions`` (name -> bool, for the null) and ``to_decide`` (lines).
    """
    missing = [a for a in ("kd", "kd+vat", "kd+vat-shuffled") if len(primary.get(a, ())) < 2]
    if missing:
        return {"verdict": "not decidable", "reason": f"fewer than 2 seeds in {missing}",
                "conditions": {}, "to_decide": [f"run {', '.join(missing)} with the protocol's "
                                                f"seeds"]}
    vs_kd = welch(primary["kd+vat"], primary["kd"])
    vs_shuf = welch(primary["kd+vat"], primary["kd+vat-shuffled"])
    oracle = (welch(primary["kd+vat-oracle"], primary["kd"])
              if len(primary.get("kd+vat-oracle", ())) >= 2 else None)
    share_gain = _mean(share.get("kd+vat", ())) - _mean(share.get("kd", ()))
    beats = lambda c, gain: bool(c is not None and c["diff"] >= gain and c["p"] < ALPHA)  # noqa: E731
    holds = beats(vs_kd, MIN_GAIN) and beats(vs_shuf, MIN_GAIN)
    conditions = {
        "teacher_accuracy_gate": bool(teacher_accuracy_ok),
        "teacher_attention_gate": bool(teacher_attention_ok),
        "oracle_beats_kd": beats(oracle, ORACLE_GAIN),
        "manipulation": bool(share_gain >= SHARE_GAIN),
        "interval_below_min_gain": bool(vs_kd["ci"][1] < MIN_GAIN),
    }
    verdict = "holds" if holds else ("null" if all(conditions.values()) else "inconclusive")
    to_decide = [] if verdict != "inconclusive" else _what_would_decide(
        conditions, vs_kd, primary)
    return {"verdict": verdict, "vs_kd": vs_kd, "vs_shuffled": vs_shuf, "oracle_vs_kd": oracle,
            "share_gain": share_gain, "conditions": conditions, "to_decide": to_decide}


def _what_would_decide(conditions: dict, vs_kd: dict, primary: Mapping) -> list[str]:
    out = []
    if not conditions["teacher_accuracy_gate"] or not conditions["teacher_attention_gate"]:
        out.append("a teacher that passes both gates (>= 90% on every question type, answer-"
                   "row share on the target cell >= 0.6 in the distilled layers)")
    if not conditions["oracle_beats_kd"]:
        out.append("an oracle arm that beats KD by >= 10 points (p < 0.05): without it the "
                   "design has not shown it can detect a gain from attention at all; a larger "
                   "student step budget is the first thing to try")
    if not conditions["manipulation"]:
        out.append("KD+VAT moving the student layer's target-cell share by >= 0.15 over KD "
                   "(a larger VAT weight, or VAT on the answer rows of sharper teacher layers)")
    if not conditions["interval_below_min_gain"]:
        sd = statistics.mean([statistics.stdev(primary["kd"]), statistics.stdev(primary["kd+vat"])])
        n = seeds_for_power(MIN_GAIN, sd) if sd > 0 else None
        out.append(f"a 90% interval of KD+VAT - KD below +5 points (now up to "
                   f"{100 * vs_kd['ci'][1]:+.1f}): more seeds; at the measured seed std "
                   f"{100 * sd:.1f} points, {n} seeds per arm give 90% power for +5")
    return out


def secondary_contrasts(values: Mapping[str, Mapping[str, Sequence[float]]]) -> dict:
    """The :data:`SECONDARY` contrasts, Holm-corrected at :data:`ALPHA`.

    ``values``: endpoint -> arm -> per-seed values. A contrast with an arm missing is left out
    of the family (and reported as such)."""
    tests, skipped = {}, []
    for name, (a, b, key) in SECONDARY.items():
        va, vb = values.get(key, {}).get(a, ()), values.get(key, {}).get(b, ())
        if len(va) < 2 or len(vb) < 2:
            skipped.append(name)
            continue
        tests[name] = welch(va, vb)
    corrected = holm({k: t["p"] for k, t in tests.items()}, ALPHA)
    return {"contrasts": {k: {**tests[k], **corrected[k]} for k in tests},
            "skipped": skipped}
