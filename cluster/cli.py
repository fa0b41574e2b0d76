"""The ``vattn`` command line: the offline commands of ``replica.cli``, and ``serve``."""

from __future__ import annotations

import argparse
import sys

from replica.cli import add_commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vattn", description="vAttention LLM serving")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
