"""The `advexplain` command: train · evaluate · serve. Each sub-command lives in services/commands/."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from advexplain.shared.errors import AdvexplainError


def set_threads(threads: int | None) -> None:
    """Pin torch's CPU threads for this process (two cores here: oversubscribing costs ~15x)."""
    import torch

    n = threads or int(os.environ.get("ADVEXPLAIN_THREADS", "0") or 0) or min(2, os.cpu_count() or 1)
    torch.set_num_threads(n)


def build_parser() -> argparse.ArgumentParser:
    from advexplain.commands import evaluate, serve, train

    parser = argparse.ArgumentParser(prog="advexplain", description=__doc__)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: ADVEXPLAIN_THREADS or 2)"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train, evaluate, serve):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    set_threads(args.threads)
    try:
        return int(args.handler(args) or 0)
    except AdvexplainError as exc:
        print(f"advexplain: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
