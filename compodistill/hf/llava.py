"""LLaVA models, re-exported from the modules that hold them: :mod:`.builders`
(:func:`build_llava`, :func:`tiny_llava_pair`) and :mod:`.taf` (TAF, docs/taf.md).

Kept so that ``from compodistill.hf.llava import X`` keeps working; importing it registers the
TAF model type with transformers' Auto classes, as importing :mod:`.taf` does.
"""
from .builders import PROJECTORS, build_llava, tiny_llava_pair
from .taf import (TAFLlavaConfig, TAFLlavaForConditionalGeneration, TAFProjector, apply_taf,
                  load_student, taf_config)

__all__ = ["build_llava", "tiny_llava_pair", "apply_taf", "load_student", "TAFProjector",
           "TAFLlavaConfig", "TAFLlavaForConditionalGeneration", "PROJECTORS", "taf_config"]
