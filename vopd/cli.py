"""The ``vopd`` command. Each subcommand parses its flags and hands a config model to the library.

Config-driven commands (train, eval) accept ``--config FILE`` plus any field by its dotted name, e.g.
``--lr 1e-4 --divergence.alpha 0.3 --teacher.mode fixed``; the command line wins over the file.
Heavy imports (torch, transformers) happen inside the subcommands so ``vopd --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from vopd.config import parse_override_value

Handler = Callable[[argparse.Namespace, dict[str, Any]], int | None]


class CliError(Exception):
    """A user error: printed as one line on stderr, exit status 2, no traceback."""


def parse_dotted_overrides(extra: Sequence[str]) -> dict[str, Any]:
    """Turn ``['--a.b', '1', '--c=x', '--flag']`` into ``{'a.b': 1, 'c': 'x', 'flag': True}``."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(extra):
        token = extra[index]
        if not token.startswith("--") or token == "--":
            raise CliError(f"unexpected argument {token!r}; settings are given as --name value")
        key = token[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            overrides[key] = parse_override_value(raw)
        elif index + 1 < len(extra) and not extra[index + 1].startswith("--"):
            overrides[key] = parse_override_value(extra[index + 1])
            index += 1
        else:
            overrides[key] = True
        index += 1
    return overrides


# --------------------------------------------------------------------------- views
def _add_views(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="JSONL or parquet dataset")
    parser.add_argument("--out", required=True, help="folder for the PNG pairs")
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples")


def _run_views(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from vopd.views import write_view_pairs

    written = write_view_pairs(args.dataset, args.out, limit=args.limit, overrides=overrides)
    print(f"wrote {written} student/teacher pairs to {args.out}")
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler, bool]] = {
    # name: (help, add_arguments, run, accepts dotted config overrides)
    "views": ("write each sample's student and teacher views as PNG", _add_views, _run_views, True),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vopd",
        description="Vision-OPD: on-policy self-distillation for fine-detail vision-language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    _, _, run, accepts_overrides = COMMANDS[args.command]
    try:
        if extra and not accepts_overrides:
            raise CliError(f"unrecognized arguments: {' '.join(extra)}")
        overrides = parse_dotted_overrides(extra)
        return int(run(args, overrides) or 0)
    except CliError as error:
        print(f"vopd {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vopd {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # user-facing errors from the library carry their own message
        from pydantic import ValidationError

        if isinstance(error, ValidationError | ValueError | FileNotFoundError):
            print(f"vopd {args.command}: error: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
