"""The ``vattn`` command line: the offline commands of ``replica.cli``, and ``serve``."""

from __future__ import annotations

import argparse
import sys

from cluster.serve_cli import add_serve_command
from replica.cli import add_commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vattn", description="vAttention LLM serving")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_command(commands)
    add_commands(commands)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
