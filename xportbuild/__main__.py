"""Command line.

    python -m xportbuild validate [recipes_dir]      every problem of every target, before any work starts
    python -m xportbuild run ARTIFACT [--prompt P | --text T | --image F | --audio F]
                                                     use a published .pte as an app does (by its task)
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
    """What the artifact's kind gives, and one line of figures; what the libraries print (the runtime's and the C++
    runner's own log lines) goes to a log file."""
    shown, figures = os.fdopen(os.dup(1), "w", buffering=1), os.fdopen(os.dup(2), "w", buffering=1)
    log = Path(tempfile.gettempdir()) / "xportbuild-run.log"
    try:
        with output_to(log):
            try:
                return _run_artifact(args, shown, figures)
            except XportError:
                raise
            except Exception as err:  # noqa: BLE001  one line for the user, the traceback in the log
                import traceback

                traceback.print_exc()
                first = (str(err).strip().splitlines() or [""])[0][:300]
                raise XportError(f"run: {type(err).__name__}: {first} (log: {log})") from err
    finally:
        shown.close()
        figures.close()


def _run_artifact(args: argparse.Namespace, shown, figures) -> int:
    import numpy as np

    from xportbuild import app

    artifact = app.load(args.artifact)
    if missing := [name for name in artifact.takes if not getattr(args, name)]:
        raise app.ArtifactError(f"run: a {artifact.task} artifact takes {' and '.join(f'--{n}' for n in missing)}")
    if isinstance(artifact, app.TextGenerator):
        artifact.generate(args.prompt, args.max_new_tokens, args.temperature, shown.write)
        shown.write("\n")
    elif isinstance(artifact, app.MaskFiller):
        fills = artifact.fill_mask(args.text[0], args.top_k)
        for rows in fills if isinstance(fills[0], list) else [fills]:
            shown.write("  ".join(f"{row['token_str'].strip()!r} {row['score']:.3f}" for row in rows) + "\n")
    elif isinstance(artifact, app.ImageClassifier):
        for row in artifact.classify(args.image, args.top_k):
            shown.write(f"{row['score']:.3f}  {row['label']}\n")
    elif isinstance(artifact, app.TextToText):
        shown.write(artifact.generate(args.text[0], args.max_new_tokens) + "\n")
    elif isinstance(artifact, app.MediaTextToText):
        shown.write(artifact.generate(args.prompt, image=args.image, audio=args.audio,
                                      max_new_tokens=args.max_new_tokens) + "\n")
    elif isinstance(artifact, app.SpeechRecognizer):
        shown.write(artifact.transcribe(args.audio, language=args.language, task=args.task,
                                        max_new_tokens=args.max_new_tokens) + "\n")
    else:
        vectors = artifact.embed(args.text)
        for i in range(len(vectors)):
            for j in range(i + 1, len(vectors)):
                shown.write(f"cosine {app.cosine(vectors[i], vectors[j]):.4f}  {args.text[i]!r} ~ {args.text[j]!r}\n")
        if len(vectors) == 1:
            shown.write(f"embedding of {len(vectors[0])} values, norm {float(np.linalg.norm(vectors[0])):.4f}\n")
    figures.write(artifact.figures.summary() + "\n")
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
    run = commands.add_parser("run", help="use a published .pte as an app does: generate text, fill masks, classify "
                                          "an image, transcribe audio, embed sentences (by the .pte's task)")
    run.add_argument("artifact", help="artifacts/<target> folder, or a .pte file (a .ptd beside it is used)")
    run.add_argument("--prompt", help="causal LM: the text to continue; image/audio-text-to-text: the question")
    run.add_argument("--text", action="append", help="masked LM: a text with <mask>; text-to-text: the input; "
                                                     "embeddings: a sentence (repeat it to compare several)")
    run.add_argument("--image", help="image classification, image-text-to-text: an image file (PNG, JPEG, ...)")
    run.add_argument("--audio", help="speech recognition, audio-text-to-text: a WAV file, any sampling rate")
    run.add_argument("--language", help="speech recognition: the spoken language (default: detected)")
    run.add_argument("--task", help="speech recognition: transcribe (default) or translate, if the model has tasks")
    run.add_argument("--top-k", type=int, default=5, help="masked LM and image classification: how many to show")
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--temperature", type=float, default=0.0, help="causal LM: 0 (default) is greedy")
    run.set_defaults(handler=_run)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except XportError as err:  # what the user can act on: its message, not a traceback
        print(err, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
