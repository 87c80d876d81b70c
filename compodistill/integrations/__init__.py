"""Our fused losses inside other training loops (docs/integrations.md).

- :mod:`.hf_trainer`: :class:`FusedDistillTrainer`, a ``transformers.Trainer`` whose
  ``compute_loss`` is LM + fused KD (+ VAT).
- :mod:`.trl`: the same inside TRL's ``DistillationTrainer`` (needs the ``trl`` extra).
- :mod:`.step`: the per-micro-batch step both share.

Nothing here is imported by ``import compodistill``; this layer sits above ``hf`` and
``train`` and below the CLI.
"""
