"""Command line.

    python -m xportbuild validate [recipes_dir]      every problem of every target, before any work starts
    python -m xportbuild run ARTIFACT --prompt TEXT  generate with a published .pte, as an app would
    python -m xportbuild fsck [recipes_dir]          read the whole cache and artifacts/ against their hashes
    python -m xportbuild status [recipes_dir]        every target: up to date or why not, size, quality, speed
    python -m xportbuild compare [recipes_dir] [--model M]   a model's targets side by side, with a plot
    python -m xportbuild targets [recipes_dir] [--model M] [--recipe R]
                                                     the targets as JSON, for a CI job matrix
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from xportbuild.build import Workspace
from xportbuild.console import output_to
from xportbuild.errors import ValidationFailed, XportError


def _validate(args: argparse.Namespace) -> int:
    from xportbuild.preflight import validate_project

    workspace = Workspace.for_project(Path(args.recipes))
    try:
        with output_to(workspace.state_dir / "logs" / "validate.log"):  # what the libraries it reads with print
            found = validate_project(Path(args.recipes).resolve(), workspace.cache_dir / "sources")
    except ValidationFailed as err:
        print(err, file=sys.stderr)
        print(err.summary)
        return 2
    print(found.summary())
    return 0


def _fsck(args: argparse.Namespace) -> int:
    from xportbuild.publish import fsck

    findings, summary = fsck(Workspace.for_project(Path(args.recipes)))
    for line in findings:
        print(f"  - {line}")
    print(summary)
    return 1 if findings else 0


def _status(args: argparse.Namespace) -> int:
    from xportbuild.status import project_status

    print(project_status(Path(args.recipes)))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from xportbuild.compare import compare_project

    written = compare_project(Path(args.recipes), args.model)
    if not written:
        print("compare: no published target to compare (build some with `doit export:<target>`)", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def _targets(args: argparse.Namespace) -> int:
    import json

    from xportbuild import backends
    from xportbuild.plan import plan_targets
    from xportbuild.recipe import load_project

    targets = [plan.target for plan in plan_targets(load_project(Path(args.recipes))).targets.values()]
    for option, wanted, known in (("--model", args.model, {t.model.name for t in targets}),
                                  ("--recipe", args.recipe, {t.recipe.name for t in targets})):
        if unknown := sorted(set(wanted or ()) - known):
            print(f"targets: {option} {', '.join(unknown)}: no target has it (known: {', '.join(sorted(known))})",
                  file=sys.stderr)
            return 2
    chosen = [t for t in targets if (not args.model or t.model.name in args.model)
              and (not args.recipe or t.recipe.name in args.recipe)]
    # GitHub Actions' matrix form: `strategy.matrix: ${{ fromJSON(needs.<job>.outputs.<name>) }}`
    print(json.dumps({"include": [{"target": t.name, "model": t.model.name, "recipe": t.recipe.name,
                                   "runner": backends.ci_runner(t.recipe.lower.backends)}
                                  for t in chosen]}))
    return 0


def _run(args: argparse.Namespace) -> int:
    from xportbuild.llm_runner import generate

    artifact = Path(args.artifact)
    pte = artifact / "model.pte" if artifact.is_dir() else artifact
    tokenizer = Path(args.tokenizer) if args.tokenizer else pte.parent / "tokenizer.json"
    for what, path in (("program", pte), ("tokenizer", tokenizer)):
        if not path.is_file():
            print(f"run: {what} {path} does not exist", file=sys.stderr)
            return 2
    # The text as it comes, and one line of figures; the runner's own log (its load and timing lines) to a file.
    shown = os.fdopen(os.dup(1), "w", buffering=1)
    log = Path(tempfile.gettempdir()) / "xportbuild-run.log"
    with output_to(log):
        figures = generate(pte, tokenizer, args.prompt, args.max_new_tokens, args.temperature, shown.write)
    shown.write("\n")
    shown.close()
    print(figures.summary(), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xportbuild")
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="check recipes and sources of every target, build nothing")
    validate.add_argument("recipes", nargs="?", default="recipes", help="the recipes folder (default: ./recipes)")
    validate.set_defaults(handler=_validate)
    fsck = commands.add_parser("fsck", help="read every cache entry and published file against its hashes; "
                                            "discard damaged entries, restore damaged published files")
    fsck.add_argument("recipes", nargs="?", default="recipes", help="the recipes folder (default: ./recipes)")
    fsck.set_defaults(handler=_fsck)
    status = commands.add_parser("status", help="every target: up to date or why not, published size, quality, "
                                                "decode speed (reads the cache; builds nothing)")
    status.add_argument("recipes", nargs="?", default="recipes", help="the recipes folder (default: ./recipes)")
    status.set_defaults(handler=_status)
    compare = commands.add_parser("compare", help="the published targets of each model side by side: a table and a "
                                                  "plot of size against agreement (artifacts/compare/)")
    compare.add_argument("recipes", nargs="?", default="recipes", help="the recipes folder (default: ./recipes)")
    compare.add_argument("--model", action="append", help="only this model (repeatable)")
    compare.set_defaults(handler=_compare)
    targets = commands.add_parser("targets", help="print the targets (or those of some models or recipes) as JSON, "
                                                  "one CI job each")
    targets.add_argument("recipes", nargs="?", default="recipes", help="the recipes folder (default: ./recipes)")
    targets.add_argument("--model", action="append", help="only this model's targets (repeatable)")
    targets.add_argument("--recipe", action="append", help="only this recipe's targets (repeatable)")
    targets.set_defaults(handler=_targets)
    run = commands.add_parser("run", help="generate text with a published causal-LM .pte (ExecuTorch's LLM runner)")
    run.add_argument("artifact", help="artifacts/<target> folder, or a .pte file (a .ptd beside it is used)")
    run.add_argument("--prompt", required=True)
    run.add_argument("--tokenizer", help="tokenizer.json (default: the one beside the .pte)")
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    run.set_defaults(handler=_run)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except XportError as err:  # what the user can act on: its message, not a traceback
        print(err, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
