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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compodistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("demo", "demo-losses"):
        demo = sub.add_parser(name, help="compute every visual-attention loss variant and "
                                         "compare with the reference (values, time, memory)")
        demo.add_argument("--batch", type=int, default=3)
        demo.add_argument("--seq-len", type=int, default=512)
        demo.add_argument("--head-dim", type=int, default=64)
        demo.add_argument("--seed", type=int, default=0)
        demo.set_defaults(func=_demo_losses)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
