"""The ``compodistill`` command line.

User errors (a missing file, a bad config key or value, a missing checkpoint) are printed as one
line and exit with status 2; ``--debug`` shows their traceback. Anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

import argparse
import sys

from .apps.console import quiet_libraries, reliance_text

DESCRIPTION = """\
Fused visual-attention distillation of vision-language models.

  compodistill demo                       distilled vs LM-only student on a tiny task (CPU)
  compodistill train --config FILE        run a config's recipe (see configs/)
  compodistill teacher-cache --config FILE
                                          the teacher's targets to disk, to train without it
  compodistill eval cr|vqa --model DIR    evaluate a saved model
  compodistill inspect --teacher DIR --student DIR --data FILE --out DIR
                                          teacher vs student visual attention, per layer
  compodistill data synth --out DIR       write the synthetic compositional data set
  compodistill demo-losses                every visual-attention loss against the reference
"""


def _demo_losses(args: argparse.Namespace) -> int:
    from .apps import demo_losses

    print(f"compodistill: every visual-attention loss on the CPU path vs the materialising "
          f"reference (B={args.batch}, N={args.seq_len}, student 8/2 heads, teacher 16/4, "
          f"d={args.head_dim}, two images in sample 0, none in sample 1, padding)\n")
    rows = demo_losses.run(args.batch, args.seq_len, args.head_dim, args.seed)
    print(demo_losses.format_table(rows))
    worst_loss = max(r["loss_diff"] for r in rows)
    worst_grad = max(r["grad_diff"] for r in rows)
    ratio = max(r["mib_ref"] for r in rows) / max(1e-9, max(r["mib_ours"] for r in rows))
    print(f"\nteacher target max |Δ| {rows[0]['target_diff']:.1e}; worst |Δloss| {worst_loss:.1e}, "
          f"worst |Δgrad| {worst_grad:.1e}; the reference needs up to {ratio:.1f}x our peak memory.")
    ok = worst_loss < 1e-4 and worst_grad < 1e-4
    print("OK" if ok else "MISMATCH: the CPU path disagrees with the reference")
    return 0 if ok else 1


def _demo(args: argparse.Namespace) -> int:
    from .apps.demo import DEFAULTS, format_summary, run_demo

    overrides = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    summary = run_demo(args.out, progress=not args.quiet, **overrides)
    print(format_summary(summary))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .data import records_skipped_line
    from .train.config import load_config
    from .train.trainer import CompoDistillTrainer, records_skipped

    config = load_config(args.config)
    if args.output_dir:
        config.output_dir = args.output_dir
    # The recipe (config.recipe) decides what run() does: a stage chain, or CoMD's rounds.
    trainer = CompoDistillTrainer(config, show_progress=not args.quiet)
    results = trainer.run(args.stages)
    for r in results:
        dropped = sum(r.records_skipped.values())
        print(f"{r.name}: {r.steps} steps in {r.seconds:.1f} s, {r.skipped_steps} non-finite "
              f"steps skipped, {dropped} records skipped, {reliance_text(r.image_reliance)}final "
              f"{r.final_losses}; metrics in {r.metrics_path}")
    print(records_skipped_line(*records_skipped(trainer.dataset)))
    if config.recipe == "comd":
        print(f"comd: round files in {config.output_dir}/round-*/, final student in "
              f"{config.output_dir}/model")
    return 0


def _teacher_cache(args: argparse.Namespace) -> int:
    from .teacher_cache import cli

    return cli.run(args)


def _data(args: argparse.Namespace) -> int:
    from .data import synthetic

    return synthetic.run(args)


def _eval(args: argparse.Namespace) -> int:
    from .eval import cli

    return cli.run(args)


def _inspect(args: argparse.Namespace) -> int:
    from .apps import inspect

    return inspect.run(args)


def build_parser() -> argparse.ArgumentParser:
    from .data.synthetic import add_arguments as add_synth_arguments
    from .apps.demo import DEFAULTS, HELP
    from .eval.cli import TASKS, add_task_arguments

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true",
                        help="no progress bars or library logs, only the results")
    common.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error")

    parser = argparse.ArgumentParser(prog="compodistill", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", parents=[common],
                          help="a whole CompoDistill run on a tiny model pair (CPU)",
                          description="The grid task (three coloured shapes on a 3x3 grid), "
                                      "the shipped tiny pretrained teacher, and two students "
                                      "from one warm-up with the same DPT -> DFT -> SFT "
                                      "stages: LM loss only, and CompoDistill (TAF, KD, VAT). "
                                      "Held-out questions scored by candidate likelihood, with "
                                      "standard errors and the distilled student's paired "
                                      "gain. Prints each phase, an estimate of the time left "
                                      "and the total time.")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    for key, value in DEFAULTS.items():
        demo.add_argument(f"--{key.replace('_', '-')}", dest=key, type=type(value), default=None,
                          help=f"{HELP[key]} (default {value})")
    demo.set_defaults(func=_demo)

    train = sub.add_parser("train", parents=[common],
                           help="run a config file's recipe (compodistill, llava_kd, llavadi, "
                                "comd)",
                           description="Run the recipe of a YAML/JSON config. teacher and "
                                       "student must be local folders written by "
                                       "save_pretrained; `compodistill demo` writes a usable "
                                       "pair under runs/demo/.")
    train.add_argument("--config", required=True, help="YAML or JSON config (see configs/)")
    train.add_argument("--stages", nargs="*", default=None,
                       help="only these stages, by name (not for comd)")
    train.add_argument("--output-dir", default=None, help="override the config's output_dir")
    train.set_defaults(func=_train)

    from .teacher_cache import cli as cache_cli

    cache = sub.add_parser("teacher-cache", parents=[common], help=cache_cli.HELP,
                           description=cache_cli.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    cache_cli.add_arguments(cache)
    cache.set_defaults(func=_teacher_cache)

    evaluate = sub.add_parser("eval", help="evaluate a saved model: cr or vqa",
                              description="Evaluate a saved model on local files.")
    tasks = evaluate.add_subparsers(dest="task", required=True, metavar="TASK")
    for task, text in TASKS.items():
        add_task_arguments(tasks.add_parser(task, parents=[common], help=text, description=text),
                           task)
    evaluate.set_defaults(func=_eval)

    inspect = sub.add_parser("inspect", parents=[common],
                             help="where the student's visual attention departs from the "
                                  "teacher's: per-layer overlays, summary plot and CSV",
                             description="Run a saved teacher and student on K samples and "
                                         "draw, for every matched layer pair, both models' "
                                         "attention from the query rows onto each image's "
                                         "patch grid, their difference and the alignment "
                                         "(VAT loss, cosine); then summary.png / summary.csv "
                                         "per student layer over the samples.")
    from .apps.inspect import add_arguments as add_inspect_arguments

    add_inspect_arguments(inspect)
    inspect.set_defaults(func=_inspect)

    data = sub.add_parser("data", help="data tools: synth", description="Data tools.")
    tools = data.add_subparsers(dest="tool", required=True, metavar="TOOL")
    synth = tools.add_parser("synth", parents=[common],
                             help="write the synthetic compositional data set (coloured shapes)",
                             description="Write the synthetic compositional data set.")
    add_synth_arguments(synth)
    data.set_defaults(func=_data)

    losses = sub.add_parser("demo-losses", parents=[common],
                            help="every visual-attention loss variant vs the materialising "
                                 "reference (values, time, memory)")
    losses.add_argument("--batch", type=int, default=3, help="batch size (default 3)")
    losses.add_argument("--seq-len", type=int, default=512, help="tokens (default 512)")
    losses.add_argument("--head-dim", type=int, default=64, help="head dim (default 64)")
    losses.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    losses.set_defaults(func=_demo_losses)
    return parser


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, FileNotFoundError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        quiet_libraries()
    try:
        return args.func(args)
    except (ValueError, OSError) as error:  # bad input: the message says what to change
        if getattr(args, "debug", False):
            raise
        print(f"compodistill {args.command}: error: {_one_line(error)}", file=sys.stderr)
        print("(run again with --debug for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"compodistill {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
