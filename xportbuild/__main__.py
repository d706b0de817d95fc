"""`python -m xportbuild validate [recipes_dir]`: every problem of every target, before any work starts."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from xportbuild.errors import ValidationFailed


def _validate(args: argparse.Namespace) -> int:
    from xportbuild.preflight import validate_project

    recipes = Path(args.recipes).resolve()
    cache = Path(os.environ.get("XPORTBUILD_CACHE") or recipes.parent / ".xportbuild" / "cache")
    try:
        count = validate_project(recipes, cache / "sources")
    except ValidationFailed as err:
        print(err, file=sys.stderr)
        return 2
    print(f"{count} targets valid")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xportbuild")
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="check recipes and sources of every target, build nothing")
    validate.add_argument("recipes", nargs="?", default="recipes", help="the recipes folder (default: ./recipes)")
    validate.set_defaults(handler=_validate)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
