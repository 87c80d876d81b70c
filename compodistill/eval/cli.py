"""``compodistill eval cr|vqa``: evaluate a saved model of any trainer family on local files.

The model directory is what ``save_pretrained`` wrote: a LLaVA, Qwen2.5-VL, Qwen3-VL (or any
family in ``compodistill.hf.families.TRAINER_FAMILIES``) model, read from its config.json,
with its tokenizer and image processor, or the model's own processor
(:func:`compodistill.data.processors.load_processor_parts`). LLaVA prompts give every image
the config's ``image_seq_length`` tokens (an image processor when saved, else a resize to the
vision tower's ``image_size`` with mean = std = 0.5); the other families encode each image as
the training data does (:func:`compodistill.data.family_inputs.family_image_inputs`), with
its own token count and the family's extra model inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

FORMATS = ("synthetic", "sugarcrepe", "winoground")


def load_model_and_encoder(path: str, num_image_tokens: int | None = None):
    """Load a model and its prompt encoder from a local checkpoint folder of a trainer family:
    a :class:`~compodistill.data.ConversationEncoder` for LLaVA, a
    :class:`~compodistill.eval.families.FamilyEncoder` for the others.

    Raises:
        ValueError: a family ``compodistill train`` does not support (listing those it
            does), or ``num_image_tokens`` for a family that counts each image's tokens.
    """
    from ..data import ConversationEncoder, ImageTransform
    from ..data.family_inputs import family_image_inputs
    from ..data.processors import load_processor_parts
    from ..hf.loading import load_family_model, resolve_model
    from .families import FamilyEncoder

    resolved = resolve_model(path, "--model")  # family, config, visual ids: read once
    family = resolved.family
    if family.name != "llava" and num_image_tokens is not None:
        raise ValueError(f"--num-image-tokens: {family.title} gives each image its own token "
                         f"count from its size; the option is for LLaVA only")
    model = load_family_model(resolved).eval()
    parts = load_processor_parts(path)
    cfg = model.config
    if family.name != "llava":
        if parts.image_processor is None:
            raise ValueError(f"--model: {path} has no image processor ({family.title} needs "
                             f"it: save the model's processor or image processor next to it)")
        # the tokenizer: InternVL's image markers live there
        image_inputs = family_image_inputs(resolved, parts.image_processor, parts.tokenizer)
        return model, FamilyEncoder(parts.tokenizer, image_inputs,
                                    image_token_id=resolved.visual_ids[0])
    images = parts.image_processor or ImageTransform(cfg.vision_config.image_size)
    encoder = ConversationEncoder(parts.tokenizer, images,
                                  num_image_tokens=num_image_tokens or cfg.image_seq_length,
                                  image_token_id=cfg.image_token_id)
    return model, encoder


TASKS = {"cr": "compositional reasoning: which of two captions fits the image",
         "vqa": "short-answer visual question answering, exact match after normalisation"}


def add_task_arguments(s: argparse.ArgumentParser, task: str) -> argparse.ArgumentParser:
    """The options of ``compodistill eval cr`` / ``eval vqa``."""
    s.add_argument("--model", required=True,
                   help="saved model folder (save_pretrained output) of a family `compodistill "
                        "train` supports; its own processor is used when saved with it")
    s.add_argument("--data", required=True, help="eval file (or SugarCrepe folder)")
    s.add_argument("--image-folder", default=None, help="default: the data file's folder")
    s.add_argument("--batch-size", type=int, default=8, help="default 8")
    s.add_argument("--max-new-tokens", type=int, default=3 if task == "cr" else 8,
                   help="generation length for the generate scorer / the answer")
    s.add_argument("--num-image-tokens", type=int, default=None,
                   help="LLaVA only: image tokens per image (default: the model config's "
                        "image_seq_length; the other families count each image's tokens)")
    s.add_argument("--device", default=None, help="e.g. cuda:0 (default: cpu)")
    s.add_argument("--out", default=None, help="write the results (with details) as JSON")
    if task == "cr":
        s.add_argument("--format", choices=FORMATS, default="synthetic",
                       help="data format (default synthetic)")
        s.add_argument("--scorers", nargs="+", default=["loglik", "generate"],
                       choices=["loglik", "generate", "caption"],
                       help="A/B by log-likelihood, A/B by generation, or caption likelihood")
    s.set_defaults(task=task)
    return s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compodistill eval", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="task", required=True)
    for task, text in TASKS.items():
        add_task_arguments(sub.add_parser(task, help=text, description=text), task)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``cr`` or ``vqa``; print a table and optionally write ``--out`` JSON."""
    from . import cr, vqa
    from .unscored import Unscored

    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model: model folder not found: {args.model}")
    if not os.path.exists(args.data):
        raise FileNotFoundError(f"--data: eval data not found: {args.data}")
    model, encoder = load_model_and_encoder(args.model, args.num_image_tokens)
    if args.device:
        model.to(args.device)
    if args.task == "cr":
        loader = {"synthetic": cr.load_synthetic_cr, "sugarcrepe": cr.load_sugarcrepe,
                  "winoground": cr.load_winoground}[args.format]
        examples = loader(args.data, args.image_folder)
        results = cr.evaluate_cr(model, examples, encoder, scorers=args.scorers,
                                 batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        print(cr.format_cr_results(results))
        payload = {k: r.to_dict(with_examples=True) for k, r in results.items()}
    else:
        examples = vqa.load_vqa_json(args.data, args.image_folder)
        res = vqa.evaluate_vqa(model, examples, encoder, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size)
        print("  ".join(f"{k}: {100 * v:.1f}%" for k, v in res.per_type.items())
              + f"  overall: {100 * res.accuracy:.1f}% (n={res.num_examples})")
        if res.unscored:
            print(Unscored(res.unscored).line(res.num_examples + len(res.unscored)))
        payload = res.to_dict(with_predictions=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
