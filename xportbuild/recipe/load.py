"""Load and validate recipes/models/*.toml and recipes/recipes/*.toml into specs, reporting every problem."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import typing
from pathlib import Path

from xportbuild import backends
from xportbuild.errors import RecipeError
from xportbuild.models.kinds import KINDS, kinds_with
from xportbuild.recipe.spec import (
    LINEAR_SCHEMES,
    LowerSpec,
    ModelSpec,
    ExportSpec,
    QuantSpec,
    RecipeSpec,
    SourceSpec,
    Target,
    Tolerances,
    VerifyInputs,
    resolve_relative,
)

_SOURCE_FIELDS = {"hub": {"repo", "revision"}}  # local and gguf: exactly one of path or package
# The recipes this checkout ships, which any project's models may name.
SHIPPED_RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "recipes"
# Names become task names and folder names under artifacts/ and the state dir: keep them plain.
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*(\.[a-z0-9_-]+)*$")


class _Problems(list):
    def add(self, file: Path, key: str, message: str) -> None:
        self.append(f"{file}: {key}: {message}")


class _Prefixed:
    """Problems about [quantize] knobs, named under the table they were read from (quantize.<method>.<knob>)."""

    def __init__(self, problems: _Problems, prefix: str):
        self.problems, self.prefix = problems, prefix

    def add(self, file: Path, key: str, message: str) -> None:
        self.problems.add(file, self.prefix + key.removeprefix("quantize."), message)


def _check_value(hint, value, file: Path, key: str, problems: _Problems):
    """Return `value` coerced to `hint`, or None after recording a problem."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            problems.add(file, key, f"{value!r} is not one of {', '.join(map(repr, allowed))}")
            return None
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.add(file, key, f"expected a list of strings, got {value!r}")
            return None
        return tuple(value)
    expected = {"str": str, "int": int, "float": (int, float), "bool": bool}[hint.__name__]
    if isinstance(value, bool) and hint is not bool or not isinstance(value, expected):
        problems.add(file, key, f"expected {hint.__name__}, got {type(value).__name__} {value!r}")
        return None
    if hint is float and not math.isfinite(value):
        problems.add(file, key, f"{value!r}: not a finite number (TOML's nan and inf compare false with everything, "
                     "so a gate of nan would pass anything); write a number")
        return None
    return float(value) if hint is float else value


def _build(cls, data: dict, file: Path, prefix: str, problems: _Problems, fixed: dict | None = None,
           tables: tuple[str, ...] = ()):
    """Build dataclass `cls` from `data`, recording unknown keys, missing keys and bad values.

    `tables` are keys the caller already consumed, named only so the list of known keys is complete."""
    fixed = fixed or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in fixed}
    if not isinstance(data, dict):
        problems.add(file, prefix.rstrip("."), f"expected a table, got {data!r}")
        return None
    for key in data:
        if key not in fields:
            problems.add(file, prefix + key, f"unknown key (known: {', '.join(sorted([*fields, *tables]))})")
    values, ok = dict(fixed), True
    for name, field in fields.items():
        if name not in data:
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if required:
                problems.add(file, prefix + name, "missing")
                ok = False
            continue
        checked = _check_value(hints[name], data[name], file, prefix + name, problems)
        ok = ok and checked is not None
        values[name] = checked
    return cls(**values) if ok else None


def _read_toml(file: Path, problems: _Problems) -> dict | None:
    try:
        return tomllib.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        problems.add(file, "(file)", f"not UTF-8 text: byte 0x{err.object[err.start]:02x} at offset {err.start}; "
                     "save the file as UTF-8")
    except (OSError, tomllib.TOMLDecodeError) as err:
        problems.add(file, "(file)", f"cannot parse TOML: {err}")
    return None


def _check_source(source: SourceSpec, file: Path, problems: _Problems) -> None:
    set_fields = {f for f in ("repo", "revision", "path", "package") if getattr(source, f)}
    if source.kind in ("gguf", "local"):
        for extra in sorted(set_fields - {"path", "package"}):
            problems.add(file, f"source.{extra}", f"not used by a {source.kind} source")
        if len(set_fields & {"path", "package"}) != 1:
            problems.add(file, "source", f"a {source.kind} source takes exactly one of `path` or `package`")
        return
    needed = _SOURCE_FIELDS[source.kind]
    for missing in sorted(needed - set_fields):
        problems.add(file, f"source.{missing}", f"required for a {source.kind} source")
    for extra in sorted(set_fields - needed):
        problems.add(file, f"source.{extra}", f"not used by a {source.kind} source")


def _load_model(file: Path, problems: _Problems) -> tuple[ModelSpec | None, dict]:
    data = _read_toml(file, problems)
    if data is None:
        return None, {}
    data = dict(data)
    overrides = data.pop("tolerances", {})
    source_data = data.pop("source", None)
    if isinstance(source_data, dict) and "trust_remote_code" in source_data:
        source_data = {key: value for key, value in source_data.items() if key != "trust_remote_code"}
        problems.add(file, "source.trust_remote_code", "xportbuild never runs code a model folder ships, whatever "
                     "this says; remove the key, and use an architecture transformers includes")
    source = _build(SourceSpec, source_data, file, "source.", problems)
    if source is not None:
        found = len(problems)
        _check_source(source, file, problems)
        source = source if len(problems) == found else None
    verify_data = data.pop("verify", None)
    verify = _build(VerifyInputs, verify_data, file, "verify.", problems)
    fixed = {"name": file.stem, "file": str(file), "source": source, "verify": verify}
    model = _build(ModelSpec, data, file, "", problems, fixed=fixed, tables=("source", "verify", "tolerances"))
    if model is not None:
        _check_sequence(model, "max_seq_len" in data, file, problems)
    if verify is not None and model is not None:
        _check_verify_inputs(model.task, verify, set(verify_data), file, problems)
    if None in (source, verify):
        return None, overrides
    return model, overrides


def _check_sequence(model: ModelSpec, declared: bool, file: Path, problems: _Problems) -> None:
    if not KINDS[model.task].has_sequence:
        if declared:
            problems.add(file, "max_seq_len", f"{model.max_seq_len} set, but task {model.task!r} has no sequence "
                         "length: it would do nothing")
    elif model.max_seq_len < 2:
        problems.add(file, "max_seq_len", f"{model.max_seq_len} is too small (at least 2)"
                     if declared else f"missing: task {model.task!r} needs a sequence length")


def _check_verify_inputs(task: str, verify: VerifyInputs, declared: set[str], file: Path, problems: _Problems) -> None:
    """What the task is verified on must be given, and what it does not use must not be (it would do nothing)."""
    kind = KINDS[task]
    if kind.prompted:
        if not verify.prompts:
            problems.add(file, "verify.prompts", f"task {task!r} is verified on text: needs at least one prompt")
        for index, prompt in enumerate(verify.prompts):
            if not prompt.strip():
                problems.add(file, f"verify.prompts[{index}]", f"{prompt!r} is empty: the model and the runner would "
                             "have nothing to continue; write a prompt or remove it")
        if "samples" in declared:
            problems.add(file, "verify.samples", f"set, but task {task!r} is verified on its prompts (one generated "
                         "input per prompt where it takes images or audio): it would do nothing")
    else:
        if verify.samples < 1:
            problems.add(file, "verify.samples", f"{verify.samples}: task {task!r} is verified on generated inputs; "
                         "at least 1")
        if "prompts" in declared:
            problems.add(file, "verify.prompts", f"set, but task {task!r} is verified on generated inputs only: it "
                         "would do nothing")
    if not kind.generates and "max_new_tokens" in declared:
        problems.add(file, "verify.max_new_tokens", f"set, but task {task!r} generates nothing: it would do nothing")
    elif verify.max_new_tokens < 1:
        problems.add(file, "verify.max_new_tokens", f"{verify.max_new_tokens}: at least 1")


def _load_recipe(file: Path, problems: _Problems) -> RecipeSpec | None:
    data = _read_toml(file, problems)
    if data is None:
        return None
    data = dict(data)
    quantize_data = data.pop("quantize", {})
    quantize_data, method_data = _split_method_tables(quantize_data, file, problems)
    quantize = _build(QuantSpec, quantize_data, file, "quantize.", problems)
    backend = _check_value(typing.get_type_hints(LowerSpec)["backend"], data.pop("backend", None), file, "backend",
                           problems)
    lower = _load_lower(data.pop("lower", {}), backend, file, problems)
    tolerances = _build(Tolerances, data.pop("verify", {}), file, "verify.", problems)
    dtype = _check_value(typing.get_type_hints(ExportSpec)["dtype"], data.pop("dtype", "float32"), file, "dtype",
                         problems)
    one_token = lower is not None and any(backends.fixed_shapes(name) for name in lower.backends)
    export = _build(ExportSpec, data.pop("export", {}), file, "export.", problems,
                    fixed={"dtype": dtype, "one_token": one_token})
    export = export if dtype is not None else None
    if export is not None and export.custom_sdpa and not export.custom_kv_cache:
        problems.add(file, "export.custom_sdpa", "true needs custom_kv_cache = true: llama::custom_sdpa reads the "
                     "cache in the layout llama::update_cache writes")
    method_quantize = []
    for method, overrides in method_data.items():
        merged = {**quantize_data, **overrides}
        spec = _build(QuantSpec, merged, file, f"quantize.{method}.", problems)
        _check_quantize(merged, spec, lower, file, problems, f"quantize.{method}.")
        method_quantize.append((method, spec))
    fixed = {"name": file.stem, "file": str(file), "quantize": quantize, "lower": lower, "tolerances": tolerances,
             "export": export, "method_quantize": tuple(method_quantize)}
    recipe = _build(RecipeSpec, data, file, "", problems, fixed=fixed,
                    tables=("backend", "dtype", "quantize", "lower", "verify", "export"))
    _check_quantize(quantize_data if isinstance(quantize_data, dict) else {}, quantize, lower, file, problems)
    if any(spec is None for _, spec in method_quantize):
        return None
    if lower is not None and export is not None:
        _check_dtype(export.dtype, lower, quantize, file, problems)
    if recipe is not None:
        _check_name(recipe, file, problems)
    return recipe if None not in (quantize, lower, tolerances, export) else None


def _load_lower(data, backend: str | None, file: Path, problems: _Problems) -> LowerSpec | None:
    """[lower], its backend's own knobs ([lower.options]) checked by the backend module, and its fallback."""
    if not isinstance(data, dict) or backend is None:
        _build(LowerSpec, data, file, "lower.", problems, fixed={"backend": backend})  # for its problems
        return None
    data = dict(data)
    options = _build(backends.options_class(backend), data.pop("options", {}), file, "lower.options.", problems)
    lower = _build(LowerSpec, data, file, "lower.", problems, fixed={"backend": backend},
                   tables=("options",))
    if options is None or lower is None:
        return None
    if lower.per_op_mode and not backends.per_op_mode(backend):
        problems.add(file, "lower.per_op_mode", f"true: the {backend} backend does not partition per op")
    if lower.fallback and (lower.fallback == backend or backends.backend(backend).DELEGATE is None):
        problems.add(file, "lower.fallback", f"{lower.fallback!r}: a fallback takes what another backend's partitioner "
                     f"left; backend {backend!r} " + ("is that backend" if lower.fallback == backend else
                                                       "partitions nothing"))
    return dataclasses.replace(lower, options=dataclasses.asdict(options))


def _check_dtype(dtype: str, lower: LowerSpec, quantize: QuantSpec | None, file: Path, problems: _Problems) -> None:
    """A program computes in `dtype` only on backends that run it, and in float32 where it is quantized."""
    for name in lower.backends:
        if dtype not in backends.dtypes(name):
            problems.add(file, "dtype", f"{dtype!r}: the {name} backend lowers programs in "
                         f"{', '.join(backends.dtypes(name))}")
    if dtype != "float32" and quantize is not None and quantize.enabled:
        problems.add(file, "dtype", f"{dtype!r}: quantized recipes compute in float32 (their activations' "
                     "quantization is calibrated in it); drop dtype or the [quantize] schemes")


def _check_name(recipe: RecipeSpec, file: Path, problems: _Problems) -> None:
    """A scheme in a recipe's name is a promise about what it builds: `fp32` quantizes nothing, `8da4w` (or any
    linear scheme) quantizes the linears with it; those of the method a later name token names, if it has a table."""
    tokens = recipe.name.split("-")
    for index, token in enumerate(tokens):
        if token in _FLOAT_TOKENS:
            for key, scheme in _quantized_parts(recipe):
                problems.add(file, key, f"{scheme!r}, but the name {recipe.name!r} (token {token!r}) promises "
                             f"{_FLOAT_TOKENS[token]} weights")
            key, computes_in = _compute_dtype(recipe)
            if computes_in != _FLOAT_TOKENS[token]:
                problems.add(file, key, f"{computes_in!r}, but the name {recipe.name!r} (token {token!r}) promises "
                             f"computation in {_FLOAT_TOKENS[token]}")
        elif token in LINEAR_SCHEMES:
            method, spec = _named_method(recipe, tokens[index + 1:])
            if spec.linear != token:
                key = f"quantize.{method}.linear" if method else "quantize.linear"
                problems.add(file, key, f"{spec.linear!r}, but the name {recipe.name!r} (token {token!r}) promises "
                             f"{token} linears: rename the recipe or quantize its linears with {token}")


_FLOAT_TOKENS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _compute_dtype(recipe: RecipeSpec) -> tuple[str, str]:
    """(the knob, the dtype) a target computes in: its backend's compute precision where the backend has that knob
    (Core ML runs a float32 program in float16), else its program's dtype."""
    if "compute_precision" in recipe.lower.options:
        return "lower.options.compute_precision", recipe.lower.options["compute_precision"]
    return "dtype", recipe.export.dtype


def _quantized_parts(recipe: RecipeSpec) -> list[tuple[str, str]]:
    """(key, scheme) of every part of every method the recipe quantizes."""
    parts = []
    for method, spec in [("", recipe.quantize), *recipe.method_quantize]:
        prefix = f"quantize.{method}." if method else "quantize."
        schemes = {"linear": spec.linear, "head": spec.head_scheme, "embedding": spec.embedding}
        parts += [(prefix + part, scheme) for part, scheme in schemes.items() if scheme != "none"]
    return parts


def _named_method(recipe: RecipeSpec, tokens: list[str]) -> tuple[str, QuantSpec]:
    """The [quantize.<method>] table a name token names (`decoder` names `text_decoder`), else [quantize]."""
    for method, spec in recipe.method_quantize:
        if any(method == token or method.endswith(f"_{token}") for token in tokens):
            return method, spec
    return "", recipe.quantize


def _split_method_tables(data, file: Path, problems: _Problems) -> tuple[dict, dict[str, dict]]:
    """[quantize] knobs, and its [quantize.<method>] tables (each overriding knobs for one method)."""
    if not isinstance(data, dict):
        return data, {}
    methods = sorted({method for kind in KINDS.values() for method in kind.methods})
    knobs, tables = {}, {}
    for key, value in data.items():
        if not isinstance(value, dict):
            knobs[key] = value
        elif key in methods:
            tables[key] = value
        else:
            problems.add(file, f"quantize.{key}", f"not a method of any task kind (methods: {', '.join(methods)})")
    return knobs, tables


def _check_quantize(data: dict, quantize: QuantSpec | None, lower: LowerSpec | None, file: Path,
                    problems: _Problems, prefix: str = "quantize.") -> None:
    """Knob combinations that cannot work on the backend, or that would silently do nothing."""
    problems = _Prefixed(problems, prefix)
    for key in ("linear_group_size", "head_group_size", "embedding_group_size"):
        size = data.get(key, 0)
        if isinstance(size, int) and (size < 0 or size % 2):
            problems.add(file, f"quantize.{key}", f"{size} must be 0 (per-channel) or a positive even number")
    for part in ("linear", "embedding"):
        if data.get(part, "none") == "none" and f"{part}_group_size" in data:
            problems.add(file, f"quantize.{part}_group_size", f"set, but quantize.{part} is \"none\": it would do nothing")
    if data.get("head", "same") in ("same", "none") and "head_group_size" in data:
        problems.add(file, "quantize.head_group_size", f"set, but quantize.head is {data.get('head', 'same')!r}: "
                     "it would do nothing (\"same\" uses linear_group_size)")
    _check_algorithm(data, file, problems)
    if quantize is None or lower is None:
        return
    if "qparams" in data and quantize.linear == "none" and quantize.head_scheme == "none" and quantize.embedding == "none":
        problems.add(file, "quantize.qparams", f"{quantize.qparams!r} set, but nothing is quantized: it would do nothing")
    for part, scheme, group_size in (("linear", quantize.linear, quantize.linear_group_size),
                                     ("head", quantize.head, quantize.head_group_size)):
        if scheme in ("none", "same"):
            continue
        if found := backends.weight_problem(lower.backend, scheme, group_size):
            knob, message = found
            problems.add(file, f"quantize.{part}{knob}", message)
    if quantize.tied_table == "shared":
        _check_shared_table(quantize, file, problems)


def _check_algorithm(data: dict, file: Path, problems) -> None:
    """GPTQ needs its calibration text; its knobs do nothing under round-to-nearest, and it picks min-max scales."""
    algorithm = data.get("algorithm", "none")
    if algorithm == "none":
        for key in ("calibration", "damping"):
            if key in data:
                problems.add(file, f"quantize.{key}", "set, but quantize.algorithm is \"none\": it would do nothing")
        return
    # a head sharing its table with the embedding keeps nearest rounding (both must keep one set of codes)
    head_rounded = data.get("head", "same") not in ("same", "none") and data.get("tied_table") != "shared"
    if data.get("linear", "none") == "none" and not head_rounded:
        problems.add(file, "quantize.algorithm", f"{algorithm!r}, but no linear is quantized: it would do nothing")
    if data.get("qparams", "affine") != "affine":
        problems.add(file, "quantize.qparams", f"{data['qparams']!r}: {algorithm} chooses min-max (\"affine\") "
                     "scales as it rounds; it would do nothing")
    damping = data.get("damping", 0.01)
    if isinstance(damping, (int, float)) and not 0 < damping <= 1:
        problems.add(file, "quantize.damping", f"{damping}: must be in (0, 1]")
    calibration = data.get("calibration", "")
    if not calibration:
        problems.add(file, "quantize.calibration", f"required by algorithm = {algorithm!r}: a text file, relative to "
                     "the recipe file")
    elif isinstance(calibration, str) and not (path := resolve_relative(str(file), calibration)).is_file():
        problems.add(file, "quantize.calibration", f"{calibration!r}: no such file ({path})")


def _check_shared_table(quantize: QuantSpec, file: Path, problems: _Problems) -> None:
    """One table serves both only if both quantize it to the same bytes: 8 bits, one scale per row."""
    head = f"{quantize.head_scheme} group {quantize.head_groups}" if quantize.head_groups else quantize.head_scheme
    embedding = (f"{quantize.embedding} group {quantize.embedding_group_size}" if quantize.embedding_group_size
                 else quantize.embedding)
    if quantize.head_scheme not in ("8da8w", "8w") or quantize.head_groups or quantize.embedding != "8w" \
            or quantize.embedding_group_size:
        problems.add(file, "quantize.tied_table", f"\"shared\" needs the head and the embedding both in 8 bits per "
                     f"channel (head 8da8w or 8w, embedding 8w, group sizes 0); this recipe has head {head}, "
                     f"embedding {embedding}")


def _custom_attention_problems(model: ModelSpec, recipe: RecipeSpec) -> list[str]:
    """Knobs only some kinds' wrappers implement: on another kind they would do nothing, so they are refused."""
    if KINDS[model.task].custom_attention:
        return []
    knobs = [f"export.{name} = true" for name in ("custom_sdpa", "custom_kv_cache") if getattr(recipe.export, name)]
    for table, spec in (("quantize", recipe.quantize), *((f"quantize.{m}", s) for m, s in recipe.method_quantize)):
        if spec.tied_table == "shared":
            knobs.append(f'{table}.tied_table = "shared"')
        if spec.algorithm != "none":  # calibrated on text a causal LM reads
            knobs.append(f'{table}.algorithm = "{spec.algorithm}"')
    accepting = " or ".join(kinds_with("custom_attention"))
    return [f"{recipe.file}: {knob}: only a {accepting} model supports it, and model {model.name} ({model.file}) is task "
            f"{model.task!r}; list a recipe without it (e.g. xnnpack-8da8w)" for knob in knobs]


def _backend_problems(model: ModelSpec, recipe: RecipeSpec) -> list[str]:
    """What the recipe's backends cannot lower for this model's kind, and a half-precision program of a kind whose
    methods take float inputs recorded in float32."""
    problems = [f"{recipe.file}: backend: {name!r} cannot lower model {model.name} ({model.file}): {reason}"
                for name in recipe.lower.backends
                if (reason := backends.refusal(name, model.task))]
    if recipe.export.dtype != "float32" and not KINDS[model.task].integer_inputs:
        problems.append(f"{recipe.file}: dtype: {recipe.export.dtype!r}: model {model.name} ({model.file}) is task "
                        f"{model.task!r}, whose methods take float inputs; only a "
                        f"{' or '.join(kinds_with('integer_inputs'))} model computes in half precision")
    return problems


def _pair(model: ModelSpec, overrides: dict, recipes: dict[str, RecipeSpec], problems: _Problems) -> list[Target]:
    file = Path(model.file)
    targets = []
    for key in overrides:
        if key not in model.recipes:
            problems.add(file, f"tolerances.{key}", "overrides a recipe this model does not list")
    for name in model.recipes:
        recipe = recipes.get(name)
        if recipe is None:
            problems.add(file, "recipes", f"unknown recipe {name!r} (known: {', '.join(sorted(recipes))})")
            continue
        problems.extend(_custom_attention_problems(model, recipe))
        problems.extend(_backend_problems(model, recipe))
        methods = KINDS[model.task].methods
        for method, _ in recipe.method_quantize:
            if method not in methods:
                problems.add(Path(recipe.file), f"quantize.{method}", f"model {model.name} (task {model.task!r}, "
                             f"{file}) has no method {method!r}; its methods: {', '.join(methods)}")
        base = dataclasses.asdict(recipe.tolerances)
        merged = _build(Tolerances, {**base, **overrides.get(name, {})}, file, f"tolerances.{name}.", problems)
        if merged is not None:
            targets.append(Target(name=f"{model.name}-{name}", model=model, recipe=recipe, tolerances=merged))
    return targets


def load_project(recipes_dir: Path, shipped_recipes: bool = True) -> list[Target]:
    """Every target declared under `recipes_dir`; raises RecipeError listing all problems at once. A model may
    name the recipes xportbuild ships (SHIPPED_RECIPES) unless `shipped_recipes` is False; a recipe of the
    project's own with the same name wins."""
    targets, problems = load_what_loads(recipes_dir, shipped_recipes)
    if problems:
        raise RecipeError(problems)
    return targets


def recipe_files(recipes_dir: Path, shipped_recipes: bool = True) -> dict[str, Path]:
    """The recipe file each recipe name resolves to: the project's own, else the shipped one."""
    shipped = sorted(SHIPPED_RECIPES.glob("*.toml")) if shipped_recipes else []
    return {file.stem: file for file in [*shipped, *sorted((Path(recipes_dir) / "recipes").glob("*.toml"))]}


def load_what_loads(recipes_dir: Path, shipped_recipes: bool = True) -> tuple[list[Target], list[str]]:
    """(targets that loaded, problems found): lets a validator check the good targets' sources too."""
    recipes_dir = Path(recipes_dir)
    problems = _Problems()
    model_files = sorted((recipes_dir / "models").glob("*.toml"))
    named = recipe_files(recipes_dir, shipped_recipes)
    if not model_files:
        problems.add(recipes_dir / "models", "(folder)", "no model files (*.toml) found")
    for file in [*model_files, *named.values()]:
        if not _NAME.match(file.stem):
            problems.add(file, "(file name)", f"{file.stem!r}: use lowercase letters, digits, '-', '_' and '.' "
                         "(it names tasks and folders under artifacts/)")
    recipes = {name: r for name, f in named.items() if (r := _load_recipe(f, problems)) is not None}
    targets: list[Target] = []
    for file in model_files:
        model, overrides = _load_model(file, problems)
        if model is not None:
            targets.extend(_pair(model, overrides, recipes, problems))
    seen: dict[str, str] = {}
    for target in targets:
        if target.name in seen:
            problems.add(Path(target.model.file), "name", f"target {target.name!r} also produced by {seen[target.name]}")
        seen[target.name] = target.model.file
    return [t for t in targets if seen[t.name] == t.model.file], list(problems)
