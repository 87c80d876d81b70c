"""An offline teacher cache: the teacher's KD and visual-attention targets on disk, so that
DPT and DFT train with no teacher loaded (docs/teacher_cache.md).

- :func:`write_teacher_cache` (``compodistill teacher-cache``): run the teacher once, write
  sharded, resumable safetensors files and a manifest.
- :class:`TeacherCache`: read a cache lazily (memory-mapped), refusing stale or damaged ones.
- :class:`CacheSource`: what the trainer holds instead of a teacher (``teacher: {cache: DIR}``).
- :func:`topk_distillation_loss`: logit KD from top-k targets plus a rest bucket.
"""
from .format import TeacherCacheError
from .loss import topk_distillation_loss
from .options import TeacherCacheOptions
from .reader import TeacherCache

__all__ = ["TeacherCacheError", "TeacherCacheOptions", "TeacherCache", "CacheSource",
           "topk_distillation_loss", "write_teacher_cache"]


def __getattr__(name):  # the trainer-side pieces import transformers: load them on use
    if name == "write_teacher_cache":
        from .writer import write_teacher_cache

        return write_teacher_cache
    if name == "CacheSource":
        from .training import CacheSource

        return CacheSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
