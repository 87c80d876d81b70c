"""An offline teacher cache: the teacher's KD and visual-attention targets on disk, so that
DPT and DFT train with no teacher loaded (docs/teacher_cache.md).

- :class:`TeacherCache`: read a cache lazily (memory-mapped), refusing stale or damaged ones.
- :func:`topk_distillation_loss`: logit KD from top-k targets plus a rest bucket.
- :func:`compodistill.teacher_cache.writer.write_teacher_cache` (``compodistill
  teacher-cache``): run the teacher once, write sharded, resumable safetensors files and a
  manifest. It sits above the trainer (it reads the run's config and data the way training
  does), so this package does not import it.
- The trainer's side: :class:`compodistill.train.cache_source.CacheSource` (what the trainer
  holds instead of a teacher, ``teacher: {cache: DIR}``) and the config section
  :class:`compodistill.train.cache_options.TeacherCacheOptions`.
"""
from .format import TeacherCacheError
from .loss import topk_distillation_loss
from .reader import TeacherCache

__all__ = ["TeacherCacheError", "TeacherCache", "topk_distillation_loss"]
