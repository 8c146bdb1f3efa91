"""The `lma` console command.

Each package contributes its subcommands through the ``lma.commands`` entry-point group
(pyproject.toml): an entry is a ``register(subparsers)`` function that adds its parsers and sets
``func`` to a handler taking the parsed arguments. Registration must be cheap (argparse only);
heavy imports happen inside the handlers. This keeps the dependency direction of DESIGN section 2:
`models` names no other package, yet `lma export`, `lma serve` and `lma bench` are one command.

A subcommand that needs an optional part of the install names it (``set_defaults(extra="train")``);
when a module of that extra is missing, the command says in one line what to install (models/extras.py),
before it starts any work.

Exit status: 0 done; 2 the input, the settings or the install is wrong (one line naming what, the
same as argparse's usage errors); 1 anything unexpected (one line that points to ``-v``, which
prints the traceback); 130 interrupted.
"""

import argparse
import logging
import sys
import traceback
from importlib.metadata import PackageNotFoundError, entry_points, version

from models.extras import EXTRA_MODULES, MissingExtra, check, missing_module

DISTRIBUTION = "lma-ctr"


def _version() -> str:
    try:
        return f"{DISTRIBUTION} {version(DISTRIBUTION)}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return f"{DISTRIBUTION} (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lma", description="CTR models with LMA embeddings: data, training, export, serving."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the traceback of an error")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for ep in sorted(entry_points(group="lma.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    prefix = f"lma {args.command}"
    extra: str | None = getattr(args, "extra", None)
    try:
        for needed in EXTRA_MODULES[extra] if extra else ():  # before any work: a long run never dies at its plot
            check(needed, str(extra), "this command")
        return int(args.func(args) or 0)
    except MissingExtra as e:
        return _fail(args, f"{prefix}: error: {e}", 2)
    except ModuleNotFoundError as e:
        module = missing_module(e, extra) if extra else None
        if extra is None or module is None:
            return _unexpected(args, prefix, e)
        return _fail(args, f"{prefix}: error: {MissingExtra('this command', extra, module)}", 2)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line
        return _fail(args, f"{prefix}: error: {e}", 2)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        return _unexpected(args, prefix, e)


def _fail(args: argparse.Namespace, line: str, code: int) -> int:
    if args.verbose:
        traceback.print_exc()
    print(line, file=sys.stderr)
    return code


def _unexpected(args: argparse.Namespace, prefix: str, e: BaseException) -> int:
    where = "the traceback is above" if args.verbose else f"rerun with `lma -v {args.command} ...` for the traceback"
    return _fail(args, f"{prefix}: unexpected error: {type(e).__name__}: {e} ({where})", 1)


if __name__ == "__main__":
    sys.exit(main())
