"""The applications built on the library: ``compodistill demo`` (:mod:`.demo`), ``compodistill
demo-losses`` (:mod:`.demo_losses`), the grounded experiment's models and fixed-budget training
(:mod:`.grounded`) and ``compodistill inspect`` (:mod:`.inspect`). Only :mod:`compodistill.cli`
imports them; nothing in the library does (docs/ARCHITECTURE.md).
"""
