"""The ``fastlrp`` command line.

    fastlrp demo [--out DIR] [--n 8] [--composite epsilon_plus] [--seed 0]

Each subcommand is a function taking the parsed arguments and returning an exit code.
Expected failures (a bad path, a bad option value) end as one line on stderr and exit code
2, without a traceback; anything else is a bug and is allowed to surface as one.
"""

from __future__ import annotations

import argparse
import sys


class _UsageError(Exception):
    """Raised instead of argparse's print-usage-and-exit, so main() reports it in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse hook
        raise _UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import format_summary, run_demo

    summary = run_demo(args.out, n=args.n, composite=args.composite, seed=args.seed)
    print(format_summary(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastlrp", description="Layer-wise Relevance Propagation for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="explain generated images with a shipped CNN and write heatmap PNGs",
        description="Explain a batch of generated images with the demo CNN shipped in the "
        "package and write one PNG per image (input next to its heatmap) plus grid.png.",
    )
    demo.add_argument("--out", default="fastlrp-demo", help="output folder (default: ./fastlrp-demo)")
    demo.add_argument("--n", type=_positive_int, default=8, help="number of images (default: 8)")
    demo.add_argument("--composite", default="epsilon_plus", help="LRP composite (default: epsilon_plus)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the image generator (default: 0)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastlrp`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except (_UsageError, OSError, ValueError) as err:
        # One line, no traceback: these are the user's to fix, not bugs.
        message = " ".join(str(err).split())
        print(f"fastlrp: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
