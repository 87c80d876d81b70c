"""Command line: ``compodistill demo`` (and more subcommands as capabilities land)."""
from __future__ import annotations

import argparse
import sys


def _demo_losses(args: argparse.Namespace) -> int:
    from . import demo_losses

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
    from .demo import DEFAULTS, format_summary, run_demo

    overrides = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    summary = run_demo(args.out, progress=not args.quiet, **overrides)
    print(format_summary(summary))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train.config import load_config
    from .train.trainer import DistillationTrainer

    config = load_config(args.config)
    if args.output_dir:
        config.output_dir = args.output_dir
    # The recipe (config.recipe) decides what run() does: a stage chain, or CoMD's rounds.
    results = DistillationTrainer(config, show_progress=not args.quiet).run(args.stages)
    for r in results:
        print(f"{r.name}: {r.steps} steps in {r.seconds:.1f} s, skipped {r.skipped_steps}, "
              f"final {r.final_losses}; metrics in {r.metrics_path}")
    if config.recipe == "comd":
        print(f"comd: round files in {config.output_dir}/round-*/, final student in "
              f"{config.output_dir}/model")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .demo import DEFAULTS

    parser = argparse.ArgumentParser(prog="compodistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="tiny end-to-end run: synthetic data, teacher, "
                                       "DPT -> DFT -> SFT, evaluation (CPU, a few minutes)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quiet", action="store_true")
    for key, value in DEFAULTS.items():
        demo.add_argument(f"--{key.replace('_', '-')}", dest=key, type=type(value), default=None,
                          help=f"default {value}")
    demo.set_defaults(func=_demo)

    train = sub.add_parser("train", help="run a config file's recipe (compodistill, llava_kd, "
                                         "llavadi, comd)")
    train.add_argument("--config", required=True, help="YAML or JSON (see configs/)")
    train.add_argument("--stages", nargs="*", default=None,
                       help="only these stages (not for comd)")
    train.add_argument("--output-dir", default=None)
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(func=_train)

    losses = sub.add_parser("demo-losses", help="every visual-attention loss variant vs the "
                                                "materialising reference (values, time, memory)")
    losses.add_argument("--batch", type=int, default=3)
    losses.add_argument("--seq-len", type=int, default=512)
    losses.add_argument("--head-dim", type=int, default=64)
    losses.add_argument("--seed", type=int, default=0)
    losses.set_defaults(func=_demo_losses)

    data = sub.add_parser("data", help="data tools: `compodistill data synth --out DIR`")
    data.add_argument("tool", choices=["synth"])
    data.add_argument("rest", nargs=argparse.REMAINDER)
    data.set_defaults(func=lambda a: __import__("compodistill.data.synthetic",
                                                fromlist=["main"]).main(a.rest))

    evaluate = sub.add_parser("eval", help="evaluation: `compodistill eval cr|vqa ...`")
    evaluate.add_argument("rest", nargs=argparse.REMAINDER)
    evaluate.set_defaults(func=lambda a: __import__("compodistill.eval.cli",
                                                    fromlist=["main"]).main(a.rest))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
