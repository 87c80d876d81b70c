"""Hypothesis profiles: "ci" (bounded, reproducible) by default, "long" with COMPODISTILL_FUZZ=1."""
import os

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test extra; the property tests skip without it
    settings = None

if settings is not None:
    _common = dict(deadline=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=30, derandomize=True, **_common)
    settings.register_profile("long", max_examples=1000, **_common)
    settings.load_profile("long" if os.environ.get("COMPODISTILL_FUZZ", "0") not in ("", "0")
                          else "ci")
