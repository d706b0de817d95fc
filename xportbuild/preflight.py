"""Checks that read a model's sources but load no weights: run for every target by `doit validate`, and by
fetch before any conversion. Each problem names the file, the field, the value and what to do."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from xportbuild import backends, passes
from xportbuild.errors import RecipeError, SourceError, SourceNotHere, ValidationFailed, XportError
from xportbuild.models.kinds import kind_of, kinds_with
from xportbuild.facts import SourceFacts, source_facts
from xportbuild.recipe.spec import ModelSpec, SourceSpec, Target

# Every token covers at least one byte of the prompt, apart from the few special tokens a tokenizer adds around it
# (BOS, EOS): a prompt this far under its budget fits without loading the tokenizer (13 s for Gemma's GGUF).
_ADDED_TOKENS_BOUND = 4
_MASK = "<mask>"  # a masked LM's prompts name its mask token so (models/masked_lm.py)


def remote_code_problem(source: SourceSpec, model_file: str, facts: SourceFacts) -> str | None:
    if facts.remote_code:
        return (f"{model_file}: source: {facts.remote_code}: the model names code of its own, and xportbuild never "
                "runs code a model folder ships; use an architecture transformers includes")
    return None


def gguf_task() -> str:
    """The task kind transformers converts GGUF files to."""
    return kinds_with("from_gguf")[0]


def model_type_problems(source: SourceSpec, model_file: str, facts: SourceFacts, task: str) -> list[str]:
    """Remote code without the opt-in, or an architecture transformers cannot build as the task's kind."""
    if remote_code := remote_code_problem(source, model_file, facts):
        return [remote_code]
    if source.kind == "gguf" and not kind_of(task).from_gguf:
        return [f"{model_file}: source.kind: \"gguf\" converts to a {gguf_task()} model only, and this model is "
                f"task {task!r}"]
    if not facts.remote_code and not _transformers_supports(source.kind, facts.model_type, task):
        what = "GGUF architecture" if source.kind == "gguf" else "model_type"
        return [f"{model_file}: source: {facts.described_by}: {what} {facts.model_type!r} has no {task} class "
                f"in this transformers version, so it cannot be exported as task \"{task}\""]
    if reason := kind_of(task).refused.get(facts.model_type):
        return [f"{model_file}: source: {facts.described_by}: model_type {facts.model_type!r} cannot be exported as "
                f"task \"{task}\": {reason}"]
    return []


def model_problems(model: ModelSpec, facts: SourceFacts) -> list[str]:
    """Why this model cannot be exported as its task kind, from its config alone."""
    problems = model_type_problems(model.source, model.file, facts, model.task)
    if facts.max_positions is not None and model.max_seq_len > facts.max_positions:
        problems.append(f"{model.file}: max_seq_len: {model.max_seq_len} exceeds the model's limit of "
                        f"{facts.max_positions} positions ({facts.described_by}); lower max_seq_len")
    return problems


def prompt_problems(model: ModelSpec, facts: SourceFacts) -> list[str]:
    """Prompts whose tokens (plus the tokens generated after them, where they share the sequence) exceed
    max_seq_len, or that hold text the tokenizer cannot encode. A folder's tokenizer is read for every prompt; a
    GGUF's (13 s to convert Gemma's) only for prompts near the budget, and it has a token for every byte."""
    kind = kind_of(model.task)
    if not kind.prompted:
        return []
    generated = model.verify.max_new_tokens if kind.prompt_continued else 0
    budget = model.max_seq_len - generated
    near = [i for i, prompt in enumerate(model.verify.prompts) if len(prompt.encode()) + _ADDED_TOKENS_BOUND > budget]
    checked = range(len(model.verify.prompts)) if model.source.kind != "gguf" else near
    if not checked:
        return []
    tokenizer = _tokenizer(model, facts)
    problems = []
    for index in checked:
        prompt = model.verify.prompts[index].replace(_MASK, getattr(tokenizer, "mask_token", None) or _MASK)
        ids = tokenizer(prompt)["input_ids"]
        if len(ids) > budget:
            plus = f" + max_new_tokens {generated}" if generated else ""
            problems.append(f"{model.file}: verify.prompts[{index}]: {len(ids)} tokens{plus} exceed max_seq_len "
                            f"{model.max_seq_len}; shorten the prompt or raise max_seq_len")
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            problems.append(f"{model.file}: verify.prompts[{index}]: {model.verify.prompts[index]!r} has text the "
                            f"model's tokenizer cannot encode (it becomes {tokenizer.unk_token}); reword the prompt")
    return problems


def _tokenizer(model: ModelSpec, facts: SourceFacts):
    from transformers import AutoTokenizer

    location = Path(facts.location)
    try:
        if model.source.kind == "gguf":
            return AutoTokenizer.from_pretrained(location.parent, gguf_file=location.name)
        return AutoTokenizer.from_pretrained(location, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001  tokenizer files are parsed in Rust and Python: any failure is the finding
        raise SourceError(f"{model.file}: source: cannot load the tokenizer of {location} ({type(err).__name__}: "
                          f"{_first_line(err)}); re-download or re-save it") from err


def tokenizer_problems(model: ModelSpec, facts: SourceFacts) -> list[str]:
    """A folder's tokenizer.json must parse, and its ids fit the model's vocabulary: a larger id would index past
    the embedding table in the program."""
    path = facts.files.get("tokenizer.json")
    if path is None:
        return []
    from tokenizers import Tokenizer

    try:
        vocabulary = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as err:  # noqa: BLE001  the Rust parser raises a bare Exception
        return [f"{model.file}: source: {path}: not a readable tokenizer ({_first_line(err)}); re-download or re-save it"]
    highest = max(vocabulary.values(), default=-1)
    if facts.vocab_size is not None and highest >= facts.vocab_size:
        return [f"{model.file}: source: {path}: token ids go up to {highest}, but the model's vocabulary "
                f"({facts.described_by}: vocab_size) has {facts.vocab_size} rows; use the tokenizer the model was "
                "made with"]
    return []


def weight_problems(model: ModelSpec, facts: SourceFacts) -> list[str]:
    """Weights the model's class expects that the checkpoint lacks or holds in another shape, read on the meta
    device (names and shapes, no data)."""
    from xportbuild.models.common import load_pretrained

    wrapper = kind_of(model.task).wrapper()
    try:
        load_pretrained(wrapper.auto_class(facts.location), facts.location, wrapper.WHAT, weights=False,
                        label=f"the checkpoint in {facts.location}")
    except XportError as err:
        return [f"{model.file}: source: {err}"]
    return []


def blocker_problems(model: ModelSpec, facts: SourceFacts) -> list[str]:
    """What the model's kind can tell from its config alone (e.g. a decoder whose cache is not a key/value cache)."""
    wrapper = kind_of(model.task).wrapper()
    if not hasattr(wrapper, "export_blocker"):
        return []
    from transformers import AutoConfig

    location = Path(facts.location)
    try:
        config = AutoConfig.from_pretrained(location.parent, gguf_file=location.name) if model.source.kind == "gguf" \
            else AutoConfig.from_pretrained(location, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001  transformers' config classes validate with errors of their own
        return [f"{model.file}: source: {facts.described_by}: transformers cannot read the config "
                f"({type(err).__name__}: {_first_line(err)}); fix or re-download it"]
    if reason := wrapper.export_blocker(config):
        return [f"{model.file}: source: {facts.described_by}: model_type {facts.model_type!r} cannot be exported as "
                f"task \"{model.task}\": {reason}"]
    return []


def _first_line(err: BaseException) -> str:
    """The message's first line, and the next where the first only announces it ("Validation error for x:")."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [""]
    return " ".join(lines[:2] if lines[0].endswith(":") else lines[:1])[:300]


def _transformers_supports(kind: str, model_type: str, task: str) -> bool:
    if kind == "gguf":
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        return model_type in GGUF_SUPPORTED_ARCHITECTURES or model_type.replace("-", "_") in GGUF_SUPPORTED_ARCHITECTURES
    from transformers.models.auto import modeling_auto

    return any(model_type in getattr(modeling_auto, mapping) for mapping in kind_of(task).auto_mappings)


def recipe_problems(target: Target, facts: SourceFacts) -> list[str]:
    """Quantization knobs that this model's layer widths would make fail or do nothing."""
    quantize, problems = target.recipe.quantize, []
    for part, scheme, group_size, widths in (
        ("linear", quantize.linear, quantize.linear_group_size, facts.linear_widths),
        ("embedding", quantize.embedding, quantize.embedding_group_size, facts.embedding_widths),
    ):
        if scheme == "none" or group_size == 0 or not widths:
            continue
        undivided = sorted(name for name, width in widths.items() if width % group_size)
        key = f"{target.recipe.file}: quantize.{part}_group_size: {group_size}"
        if len(undivided) == len(widths):
            problems.append(f"{key} divides no {part} layer of model {target.model.name} (widths "
                            f"{sorted(set(widths.values()))}); pick a divisor of one of them")
        elif undivided and not quantize.per_axis_fallback:
            problems.append(f"{key} does not divide {len(undivided)} {part} layers of model {target.model.name} "
                            f"(e.g. {undivided[0]}, width {widths[undivided[0]]}); set per_axis_fallback = true "
                            "or pick another group size")
    return problems


@dataclass
class Validation:
    """What validate found: problems (each one line), and models that are fine but not on this machine yet, with
    the command that brings each."""

    targets: list[Target]
    problems: list[str] = field(default_factory=list)
    downloads: dict[str, str] = field(default_factory=dict)  # model name -> the command that downloads it
    installs: dict[str, str] = field(default_factory=dict)  # target name -> what its backend needs installed here

    def summary(self) -> str:
        waiting = [t for t in self.targets if t.model.name in self.downloads or t.name in self.installs]
        valid = len(self.targets) - len(waiting)
        lines = [f"{valid} targets valid and buildable here" if not self.problems else
                 f"{len(self.targets)} targets checked"]
        if self.downloads:
            lines.append(f"{len(waiting)} targets of {len(self.downloads)} models need their weights downloaded "
                         "first (their sources are checked once they are here):")
            lines += [f"  {model}: {command}" for model, command in sorted(self.downloads.items())]
        if self.installs:
            lines.append(f"{len(self.installs)} targets need their backend's packages installed first:")
            lines += [f"  {target}: {why}" for target, why in sorted(self.installs.items())]
        return "\n".join(lines)


def validate(targets: list[Target], scratch_root: Path) -> Validation:
    """Every problem of every target that can be found before building, each model's source read once."""
    found = Validation(targets)
    facts_by_model: dict[str, SourceFacts | None] = {}
    for recipe in {target.recipe.name: target.recipe for target in targets}.values():
        try:
            found.problems.extend(passes.import_problems(passes.locate(recipe.lower.passes, recipe.file), recipe.file))
        except RecipeError as err:
            found.problems.extend(err.problems)
    for target in targets:
        model = target.model
        if missing := backends.unavailable_here(target.recipe.lower.backends):
            found.installs[target.name] = missing
        if model.name not in facts_by_model:
            try:
                facts_by_model[model.name], problems = _model_findings(model, scratch_root)
                found.problems.extend(problems)
            except SourceNotHere as err:
                facts_by_model[model.name] = None
                found.downloads[model.name] = err.download
        facts = facts_by_model[model.name]
        if facts is not None:
            found.problems.extend(recipe_problems(target, facts))
    return found


def _model_findings(model: ModelSpec, scratch_root: Path) -> tuple[SourceFacts | None, list[str]]:
    """The model's source facts (None if they cannot be read) and every problem of the model and its source."""
    try:
        facts = source_facts(model.source, model.file, scratch_root)
    except SourceNotHere:
        raise
    except SourceError as err:
        return None, [str(err)]
    problems = model_problems(model, facts) or blocker_problems(model, facts)
    if problems:  # a model that cannot be built as its kind, or runs code of its own: nothing more is read
        return facts, problems
    checks = [tokenizer_problems, weight_problems] if model.source.kind != "gguf" else []
    for check in (*checks, prompt_problems):
        try:
            problems.extend(check(model, facts))
        except SourceError as err:
            problems.append(str(err))
        except Exception as err:  # noqa: BLE001  validate reports, it never crashes: a check that broke is a finding
            problems.append(f"{model.file}: source: {facts.described_by}: checking it raised {type(err).__name__}: "
                            f"{_first_line(err)}; the build would likely fail the same way")
    return facts, problems


def validate_project(recipes_dir: Path, scratch_root: Path) -> Validation:
    """Check recipes, then every loadable target's source; raises ValidationFailed with all problems."""
    from xportbuild.recipe.load import load_what_loads

    targets, problems = load_what_loads(recipes_dir)
    found = validate(targets, scratch_root)
    found.problems[:0] = problems
    if found.problems:
        raise ValidationFailed(found.problems, found.summary())
    return found
