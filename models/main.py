"""The `lma` console command.

Each package contributes its subcommands through the ``lma.commands`` entry-point group
(pyproject.toml): an entry is a ``register(subparsers)`` function that adds its parsers and sets
``func`` to a handler taking the parsed arguments. Registration must be cheap (argparse only);
heavy imports happen inside the handlers. This keeps the dependency direction of DESIGN section 2:
`models` names no other package, yet `lma export`, `lma serve` and `lma bench` are one command.
"""

import argparse
import logging
import sys
from importlib.metadata import entry_points


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lma", description="CTR models with LMA embeddings: data, training, export, serving."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for ep in sorted(entry_points(group="lma.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"lma {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
