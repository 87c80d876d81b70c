"""Recipes: the seed methods as variants of one trainer (docs/stages.md).

A recipe decides, per stage, which module the engine wraps, which extra parameters it trains
and which loss terms it computes (:class:`~.base.Recipe`); CoMD replaces the stage chain by
its competitive rounds. ``config.recipe`` picks one:

==============  =====================================================================
compodistill    DPT → DFT → SFT with TAF, fused logit KD and visual-attention alignment
llava_kd        DPT → SFT → DFT; CE + KL_res + KL_vis + RDist (:mod:`.llava_kd`)
llavadi         z-scored logit KL on all tokens + projected hidden-state MSE (:mod:`.llavadi`)
comd            rounds of tuning → assessment → augmentation → tuning (:mod:`.comd`)
==============  =====================================================================

>>> recipe = get_recipe("llava_kd")
"""
from __future__ import annotations

import importlib
from typing import Callable

from .base import Recipe, StageParts
from .facts import BUILTIN, RecipeFacts

__all__ = ["Recipe", "RecipeFacts", "StageParts", "get_recipe", "register_recipe",
           "unregister_recipe", "recipe_names", "recipe_facts"]

# name -> "module:factory"; imported on first use, so the config reads the built-in recipes'
# facts (.facts) without importing the recipes, which import the stages and the trainer.
_REGISTRY: dict[str, str | Callable[[], Recipe]] = {
    "compodistill": "compodistill.train.recipes.compodistill:CompoDistillRecipe",
    "llava_kd": "compodistill.train.recipes.llava_kd:LlavaKDRecipe",
    "llavadi": "compodistill.train.recipes.llavadi:LlavaDIRecipe",
    "comd": "compodistill.train.recipes.comd:CoMDRecipe",
}


_BUILTIN = frozenset(_REGISTRY)
_BUILTIN_PATHS = dict(_REGISTRY)


def recipe_names() -> list[str]:
    """Names :func:`get_recipe` accepts."""
    return sorted(_REGISTRY)


def register_recipe(name: str, factory: Callable[[], Recipe]) -> None:
    """Make ``config.recipe: name`` and ``get_recipe(name)`` use ``factory()``.

    ``factory`` is a :class:`Recipe` subclass (or a callable returning an instance); its
    ``facts`` (:class:`RecipeFacts`) tell the config which terms, stage defaults and chain the
    recipe has, so nothing else needs registering.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a recipe name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = factory


def unregister_recipe(name: str) -> None:
    """Remove a recipe added with :func:`register_recipe` (the built-in ones stay)."""
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in recipe and cannot be removed")
    _REGISTRY.pop(name, None)


def _factory(name: str) -> Callable[[], Recipe]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown recipe {name!r}; known: {recipe_names()}")
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, attr = factory.split(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory


def get_recipe(name: str) -> Recipe:
    """A fresh instance of the recipe called ``name``."""
    return _factory(name)()


def recipe_facts(name: str) -> RecipeFacts:
    """The :class:`RecipeFacts` of the recipe called ``name``."""
    if name in _BUILTIN_PATHS and _REGISTRY.get(name) == _BUILTIN_PATHS[name]:  # no import
        return BUILTIN[name]
    factory = _factory(name)
    facts = getattr(factory, "facts", None)
    if facts is None:  # a plain callable: ask an instance
        facts = getattr(factory(), "facts", None)
    if not isinstance(facts, RecipeFacts):
        raise TypeError(f"recipe {name!r} has no RecipeFacts in its `facts` attribute")
    return facts
