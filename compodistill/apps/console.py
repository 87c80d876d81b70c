"""What the command-line applications share on the console: quiet libraries, our own data-loss
warnings always shown, and the image-reliance text of a stage's summary line."""
from __future__ import annotations


def quiet_libraries(logs: bool = True) -> None:
    """No loading bars from transformers / the hub; with ``logs`` no info logs either
    (``--quiet``). The demo uses it without ``logs``: the bars would interleave with its
    phase lines."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # the core install has no transformers
        return
    hf_logging.disable_progress_bar()
    if logs:
        hf_logging.set_verbosity_error()
    keep_data_loss_warnings()


def keep_data_loss_warnings() -> None:
    """Our own warnings (records dropped, a model blind to its images) are shown whatever a
    library or PYTHONWARNINGS filtered."""
    import warnings

    from ..data.dataset import DataLossWarning
    from ..train.image_reliance import BlindModelWarning

    warnings.filterwarnings("always", category=DataLossWarning)
    warnings.filterwarnings("always", category=BlindModelWarning)


def reliance_text(reliance: dict) -> str:
    """``image reliance student +0.412, teacher +0.630; `` ('' when not measured)."""
    if not reliance:
        return ""
    return "image reliance " + ", ".join(f"{who} {v:+.3f}" for who, v in reliance.items()) + "; "
