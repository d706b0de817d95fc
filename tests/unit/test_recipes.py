"""recipe loading: shipped files load; bad files are rejected naming file, key and value, all at once."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from xportbuild.errors import RecipeError
from xportbuild.recipe import load_project

REPO = Path(__file__).resolve().parents[2]
SHIPPED_RECIPES = sorted((REPO / "recipes" / "recipes").glob("*.toml"))


def test_shipped_targets_load():
    targets = load_project(REPO / "recipes")
    names = {t.name for t in targets}
    assert "gemma3-xnnpack-8da8w-shared" in names and "gemma3-xnnpack-8da8w-shared-plain-ops" in names
    # Every task kind has a shipped model with an fp32 and a quantized recipe.
    from xportbuild.models.kinds import KINDS

    for task in KINDS:
        recipes = {t.recipe.name for t in targets if t.model.task == task}
        assert "xnnpack-fp32" in recipes and any(r.startswith("xnnpack-8da") for r in recipes), (task, recipes)


@pytest.mark.parametrize("recipe_file", SHIPPED_RECIPES, ids=lambda p: p.stem)
def test_each_shipped_recipe_is_used_and_valid(recipe_file):
    names = {t.recipe.name for t in load_project(REPO / "recipes")}
    assert recipe_file.stem in names


def _project(tmp_path: Path, model: str, recipe: str | None = None) -> Path:
    shutil.copytree(REPO / "recipes" / "recipes", tmp_path / "recipes" / "recipes")
    (tmp_path / "recipes" / "models").mkdir()
    (tmp_path / "recipes" / "models" / "m.toml").write_text(model)
    if recipe is not None:
        (tmp_path / "recipes" / "recipes" / "r.toml").write_text(recipe)
    return tmp_path / "recipes"


GOOD_MODEL = """doc = "x"\ntask = "causal-lm"\nmax_seq_len = 64\nrecipes = ["xnnpack-fp32"]
[source]\nkind = "local"\npath = "w"\n[verify]\nprompts = ["hi"]\n"""


def test_good_model_loads(tmp_path):
    (target,) = load_project(_project(tmp_path, GOOD_MODEL))
    assert target.name == "m-xnnpack-fp32" and target.model.verify.prompts == ("hi",)


def test_every_problem_reported_at_once(tmp_path):
    model = GOOD_MODEL.replace("max_seq_len = 64", 'max_seq_len = "64"\nmax_seq_lenn = 3').replace(
        '"xnnpack-fp32"', '"xnnpack-fp32", "r"')
    recipe = 'doc = "bad"\nbackend = "tpu"\n[quantize]\nlinear = "3w"\nlinear_group_size = 33\n'
    with pytest.raises(RecipeError) as caught:
        load_project(_project(tmp_path, model, recipe))
    text = str(caught.value)
    assert "m.toml: max_seq_len: expected int, got str '64'" in text
    assert "m.toml: max_seq_lenn: unknown key" in text
    assert "r.toml: backend: 'tpu' is not one of 'xnnpack', 'portable'" in text
    assert "r.toml: quantize.linear: '3w' is not one of" in text
    assert "r.toml: quantize.linear_group_size: 33 must be 0" in text


def test_knobs_that_would_do_nothing_are_rejected(tmp_path):
    recipe = 'doc = "x"\nbackend = "portable"\n[quantize]\nembedding_group_size = 32\n[lower]\nper_op_mode = true\n'
    with pytest.raises(RecipeError) as caught:
        load_project(_project(tmp_path, GOOD_MODEL.replace('"xnnpack-fp32"', '"r"'), recipe))
    assert "quantize.embedding_group_size: set, but quantize.embedding is \"none\"" in str(caught.value)
    assert "lower.per_op_mode: true: the portable backend does not partition per op" in str(caught.value)


def test_an_app_names_shipped_recipes_without_copying_them_and_its_own_win(tmp_path):
    (tmp_path / "recipes" / "models").mkdir(parents=True)
    (tmp_path / "recipes" / "models" / "m.toml").write_text(GOOD_MODEL.replace('"xnnpack-fp32"', '"xnnpack-fp32", "xnnpack-8da8w"'))
    shipped = {t.recipe.name: t.recipe for t in load_project(tmp_path / "recipes")}
    assert Path(shipped["xnnpack-fp32"].file) == REPO / "recipes" / "recipes" / "xnnpack-fp32.toml"

    (tmp_path / "recipes" / "recipes").mkdir()
    own = tmp_path / "recipes" / "recipes" / "xnnpack-fp32.toml"
    own.write_text('doc = "the app\'s float recipe"\nbackend = "portable"\n')
    mixed = {t.recipe.name: t.recipe for t in load_project(tmp_path / "recipes")}
    assert mixed["xnnpack-fp32"].doc == "the app's float recipe" and Path(mixed["xnnpack-fp32"].file) == own
    assert mixed["xnnpack-8da8w"] == shipped["xnnpack-8da8w"]

    with pytest.raises(RecipeError, match=re.escape("unknown recipe 'xnnpack-8da8w' (known: xnnpack-fp32)")):
        load_project(tmp_path / "recipes", shipped_recipes=False)


def test_unknown_recipe_name_lists_known(tmp_path):
    known = ", ".join(sorted(recipe.stem for recipe in SHIPPED_RECIPES))
    with pytest.raises(RecipeError, match=re.escape(f"unknown recipe 'nope' (known: {known})")):
        load_project(_project(tmp_path, GOOD_MODEL.replace('"xnnpack-fp32"', '"nope"')))


def test_source_fields_must_match_kind(tmp_path):
    model = GOOD_MODEL.replace('path = "w"', 'repo = "org/x"')
    with pytest.raises(RecipeError) as caught:
        load_project(_project(tmp_path, model))
    assert "source: a local source takes exactly one of `path` or `package`" in str(caught.value)
    assert "source.repo: not used by a local source" in str(caught.value)


def test_tolerance_override_of_unlisted_recipe(tmp_path):
    model = GOOD_MODEL + '[tolerances.xnnpack-8da8w-shared]\nmin_top1 = 0.5\n'
    with pytest.raises(RecipeError, match="tolerances.xnnpack-8da8w-shared: overrides a recipe this model does not list"):
        load_project(_project(tmp_path, model))


def test_model_override_applies_to_its_target_only(tmp_path):
    model = GOOD_MODEL.replace('["xnnpack-fp32"]', '["xnnpack-fp32", "portable-fp32"]')
    model += '[tolerances.portable-fp32]\nmin_top1 = 0.5\n'
    targets = {t.name: t for t in load_project(_project(tmp_path, model))}
    assert targets["m-portable-fp32"].tolerances.min_top1 == 0.5
    assert targets["m-xnnpack-fp32"].tolerances.min_top1 == 0.99


def test_unimportable_pass_is_a_recipe_error(tmp_path):
    from xportbuild.plan import plan_targets

    recipe = 'doc = "x"\nbackend = "xnnpack"\n[lower]\npasses = ["no_such_module:fn", "nope"]\n'
    targets = load_project(_project(tmp_path, GOOD_MODEL.replace('"xnnpack-fp32"', '"r"'), recipe))
    with pytest.raises(RecipeError) as caught:
        plan_targets(targets)
    assert "r.toml: lower.passes: 'no_such_module:fn'" in str(caught.value)
    assert "unknown pass 'nope'" in str(caught.value)


# (recipe body after `doc` and `backend`, the message naming file, key and value)
REJECTED_RECIPES = [
    ('backend = "xnnpack"\n[quantize]\nlinear = "8da4w"\nlinear_group_size = 16\n',
     "quantize.linear_group_size: 16: XNNPACK needs a multiple of 32"),
    ('backend = "xnnpack"\n[quantize]\nlinear = "8da4w"\nhead = "8da8w"\nhead_group_size = 48\n',
     "quantize.head_group_size: 48: XNNPACK needs a multiple of 32"),
    ('backend = "xnnpack"\n[quantize]\nlinear = "8da8w"\nlinear_group_size = 64\n',
     "quantize.linear_group_size: 64: XNNPACK has no group-wise kernels for 8-bit"),
    ('backend = "portable"\n[quantize]\nlinear = "8da4w"\n',
     "quantize.linear: '8da4w': the portable backend has no kernels"),
    ('backend = "portable"\n[quantize]\nhead = "8w"\n', "quantize.head: '8w': the portable backend has no kernels"),
    ('backend = "xnnpack"\n[quantize]\nlinear = "8da4w"\nhead_group_size = 64\n',
     "quantize.head_group_size: set, but quantize.head is 'same'"),
    ('backend = "xnnpack"\n[quantize]\nqparams = "hqq"\n', "quantize.qparams: 'hqq' set, but nothing is quantized"),
    ('backend = "xnnpack"\n[quantize]\nlinear = "8da4w"\nqparams = "minmax"\n',
     "quantize.qparams: 'minmax' is not one of 'affine', 'hqq'"),
    ('backend = "xnnpack"\n[quantize]\nlinear = "8da8w"\nlinear_group_size = 0\nhead = "8da4w"\nhead_group_size = 32\n'
     'embedding = "8w"\ntied_table = "shared"\n',
     'quantize.tied_table: "shared" needs the head and the embedding both in 8 bits per channel (head 8da8w or 8w, '
     'embedding 8w, group sizes 0); this recipe has head 8da4w group 32, embedding 8w'),
    ('backend = "xnnpack"\n[quantize]\nlinear = "8da8w"\nlinear_group_size = 0\nembedding = "4w"\n'
     'embedding_group_size = 32\ntied_table = "shared"\n',
     'quantize.tied_table: "shared" needs the head and the embedding both in 8 bits per channel'),
    ('backend = "xnnpack"\n[quantize]\nlinear = "8da8w"\nlinear_group_size = 0\ntied_table = "one"\n',
     "quantize.tied_table: 'one' is not one of 'copies', 'shared'"),
    ('backend = "xnnpack"\n[quantize]\nlinear = "8da4w"\nalgorithm = "awq"\n',
     "quantize.algorithm: 'awq' is not one of 'none', 'gptq'"),
    ('backend = "xnnpack"\n[quantize]\nlinear = "8da4w"\nalgorithm = "gptq"\n',
     "quantize.calibration: required by algorithm = 'gptq'"),
    ('backend = "xnnpack"\n[quantize]\nlinear = "8da4w"\nalgorithm = "gptq"\ncalibration = "nope.txt"\n',
     "quantize.calibration: 'nope.txt': no such file"),
    ('backend = "xnnpack"\n[quantize]\nlinear = "8da4w"\nalgorithm = "gptq"\ncalibration = "calibration/english.txt"\n'
     'qparams = "hqq"\n', "quantize.qparams: 'hqq': gptq chooses min-max"),
    ('backend = "xnnpack"\n[quantize]\nlinear = "8da4w"\nalgorithm = "gptq"\ncalibration = "calibration/english.txt"\n'
     'damping = 0\n', "quantize.damping: 0: must be in (0, 1]"),
    ('backend = "xnnpack"\n[quantize]\nlinear = "8da4w"\ndamping = 0.1\n',
     'quantize.damping: set, but quantize.algorithm is "none": it would do nothing'),
    ('backend = "xnnpack"\n[quantize]\nembedding = "8w"\nalgorithm = "gptq"\ncalibration = "calibration/english.txt"\n',
     "quantize.algorithm: 'gptq', but no linear is quantized"),
    ('backend = "xnnpack"\n[quantize]\nhead = "8da8w"\nhead_group_size = 0\nembedding = "8w"\ntied_table = "shared"\n'
     'algorithm = "gptq"\ncalibration = "calibration/english.txt"\n', "quantize.algorithm: 'gptq', but no linear is quantized"),
]


@pytest.mark.parametrize("body, message", REJECTED_RECIPES, ids=[m.split(":")[0] + " " + m.split(":")[1][:12]
                                                                   for _, m in REJECTED_RECIPES])
def test_recipe_rejected_naming_file_key_and_value(tmp_path, body, message):
    with pytest.raises(RecipeError, match=re.escape(f"r.toml: {message}")):
        load_project(_project(tmp_path, GOOD_MODEL.replace('"xnnpack-fp32"', '"r"'), f'doc = "x"\n{body}'))


# (recipe name, body after `doc` and `backend`, the message naming file, key, value and the name's token)
MISNAMED_RECIPES = [
    ("xnnpack-8da4w", '[quantize]\nlinear = "8da8w"\nlinear_group_size = 0\n',
     "xnnpack-8da4w.toml: quantize.linear: '8da8w', but the name 'xnnpack-8da4w' (token '8da4w') promises 8da4w "
     "linears"),
    ("xnnpack-8da8w-small", '[quantize]\nlinear = "8da4w"\n',
     "xnnpack-8da8w-small.toml: quantize.linear: '8da4w', but the name 'xnnpack-8da8w-small' (token '8da8w')"),
    ("xnnpack-4w", "", "xnnpack-4w.toml: quantize.linear: 'none', but the name 'xnnpack-4w' (token '4w')"),
    ("xnnpack-fp32-tables", '[quantize]\nembedding = "8w"\n',
     "xnnpack-fp32-tables.toml: quantize.embedding: '8w', but the name 'xnnpack-fp32-tables' (token 'fp32') promises "
     "float32 weights"),
    # a per-method recipe: the name's `decoder` names the text_decoder table, whose linears must be 8da4w
    ("xnnpack-8da4w-decoder", '[quantize]\nlinear = "8da4w"\n[quantize.text_decoder]\nlinear = "8da8w"\n'
     "linear_group_size = 0\n",
     "xnnpack-8da4w-decoder.toml: quantize.text_decoder.linear: '8da8w', but the name 'xnnpack-8da4w-decoder' "
     "(token '8da4w')"),
]


@pytest.mark.parametrize("name, body, message", MISNAMED_RECIPES, ids=[name for name, _, _ in MISNAMED_RECIPES])
def test_a_recipe_whose_name_states_another_scheme_is_refused(tmp_path, name, body, message):
    project = _project(tmp_path, GOOD_MODEL.replace('"xnnpack-fp32"', f'"{name}"'))
    (project / "recipes" / f"{name}.toml").write_text(f'doc = "x"\nbackend = "xnnpack"\n{body}')
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_project(project)


MASKED_LM = GOOD_MODEL.replace('task = "causal-lm"', 'task = "masked-lm"')
IMAGE_CLASSIFIER = 'doc = "x"\ntask = "image-classification"\nrecipes = ["r"]\n' \
                   '[source]\nkind = "local"\npath = "w"\n[verify]\nsamples = 0\n'


@pytest.mark.parametrize("model, body, message", [
    (GOOD_MODEL, 'backend = "xnnpack"\n[quantize]\nlinear = "8da8w"\nlinear_group_size = 0\n[quantize.decoder]\n'
     'linear = "8da4w"\n', "r.toml: quantize.decoder: not a method of any task kind (methods: audio_encoder, encoder"),
    (GOOD_MODEL, 'backend = "xnnpack"\n[quantize]\nlinear = "8da8w"\nlinear_group_size = 0\n[quantize.text_decoder]\n'
     'linear = "8da4w"\nlinear_group_size = 16\n', "r.toml: quantize.text_decoder.linear_group_size: 16: XNNPACK needs"),
    (GOOD_MODEL, 'backend = "xnnpack"\n[quantize]\nlinear = "8da8w"\nlinear_group_size = 0\n[quantize.text_decoder]\n'
     'linear = "8da4w"\n', "r.toml: quantize.text_decoder: model m (task 'causal-lm'"),
    (MASKED_LM, 'backend = "xnnpack"\n[export]\ncustom_sdpa = true\ncustom_kv_cache = true\n',
     "r.toml: export.custom_sdpa = true: only a causal-lm model supports it, and model m"),
    (MASKED_LM, 'backend = "xnnpack"\n[quantize]\nlinear = "8da8w"\nlinear_group_size = 0\nembedding = "8w"\n'
     '[quantize.forward]\ntied_table = "shared"\n',
     'r.toml: quantize.forward.tied_table = "shared": only a causal-lm model supports it'),
    (MASKED_LM, 'backend = "xnnpack"\n[quantize]\nlinear = "8da4w"\nalgorithm = "gptq"\n'
     'calibration = "calibration/english.txt"\n', 'r.toml: quantize.algorithm = "gptq": only a causal-lm model supports it'),
    (IMAGE_CLASSIFIER, 'backend = "xnnpack"\n', "m.toml: verify.samples: 0: task 'image-classification' is verified on "
     "generated inputs"),
    (MASKED_LM.replace('prompts = ["hi"]', "max_new_tokens = 4"), 'backend = "xnnpack"\n',
     "m.toml: verify.prompts: task 'masked-lm' is verified on text"),
    (MASKED_LM.replace('prompts = ["hi"]', 'prompts = ["hi"]\nmax_new_tokens = 4'), 'backend = "xnnpack"\n',
     "m.toml: verify.max_new_tokens: set, but task 'masked-lm' generates nothing: it would do nothing"),
    (MASKED_LM.replace('prompts = ["hi"]', 'prompts = ["hi"]\nsamples = 2'), 'backend = "xnnpack"\n',
     "m.toml: verify.samples: set, but task 'masked-lm' is verified on its prompts"),
    (IMAGE_CLASSIFIER.replace("samples = 0", 'samples = 1\nprompts = ["a cat"]'), 'backend = "xnnpack"\n',
     "m.toml: verify.prompts: set, but task 'image-classification' is verified on generated inputs only"),
    (IMAGE_CLASSIFIER.replace("samples = 0", "samples = 1").replace('recipes = ["r"]', 'recipes = ["r"]\nmax_seq_len = 8'),
     'backend = "xnnpack"\n', "m.toml: max_seq_len: 8 set, but task 'image-classification' has no sequence length"),
])
def test_kind_specific_problems_name_file_key_and_value(tmp_path, model, body, message):
    with pytest.raises(RecipeError) as caught:
        load_project(_project(tmp_path, model.replace('"xnnpack-fp32"', '"r"'), f'doc = "x"\n{body}'))
    assert message in str(caught.value)


def test_an_image_classifier_needs_no_sequence_length(tmp_path):
    (target,) = load_project(_project(tmp_path, IMAGE_CLASSIFIER.replace("samples = 0", "samples = 3"),
                                      'doc = "x"\nbackend = "xnnpack"\n'))
    assert target.model.max_seq_len == 0 and target.model.verify.samples == 3


def _recipe_problems(tmp_path, model: str, recipe: str) -> str:
    with pytest.raises(RecipeError) as err:
        load_project(_project(tmp_path, model.replace('"xnnpack-fp32"', '"r"'), recipe))
    return str(err.value)


IMAGE_MODEL = """doc = "x"\ntask = "image-classification"\nrecipes = ["xnnpack-fp32"]
[source]\nkind = "local"\npath = "w"\n[verify]\nsamples = 2\n"""


@pytest.mark.parametrize("recipe, key, says", [
    ('doc = "x"\nbackend = "coreml"\n[lower.options]\ncompute_precision = "float8"\n',
     "lower.options.compute_precision", "'float8' is not one of"),
    ('doc = "x"\nbackend = "openvino"\n[lower.options]\nthreads = 4\n', "lower.options.threads", "unknown key"),
    ('doc = "x"\nbackend = "xnnpack"\n[lower]\nfallback = "xnnpack"\n', "lower.fallback", "is that backend"),
    ('doc = "x"\nbackend = "portable"\n[lower]\nfallback = "xnnpack"\n', "lower.fallback", "partitions nothing"),
    ('doc = "x"\nbackend = "openvino"\ndtype = "float16"\n', "dtype", "lowers programs in float32"),
    ('doc = "x"\nbackend = "xnnpack"\ndtype = "float16"\n[quantize]\nlinear = "8da8w"\nlinear_group_size = 0\n',
     "dtype", "quantized recipes compute in float32"),
    ('doc = "x"\nbackend = "xnnpack"\ndtype = "half"\n', "dtype", "'half' is not one of"),
])
def test_backend_knobs_and_dtype_are_checked_naming_file_and_key(tmp_path, recipe, key, says):
    message = _recipe_problems(tmp_path, IMAGE_MODEL, recipe)
    assert f"r.toml: {key}: " in message and says in message, message


def test_a_name_promising_a_precision_must_compute_in_it(tmp_path):
    recipes = _project(tmp_path, GOOD_MODEL) / "recipes"
    (recipes / "xnnpack-fp16-mine.toml").write_text('doc = "x"\nbackend = "xnnpack"\n')
    (recipes / "coreml-fp32-mine.toml").write_text('doc = "x"\nbackend = "coreml"\n')  # Core ML computes in fp16 by default
    with pytest.raises(RecipeError) as err:
        load_project(recipes.parent)
    assert "xnnpack-fp16-mine.toml: dtype: 'float32', but the name" in str(err.value)
    assert "coreml-fp32-mine.toml: lower.options.compute_precision: 'float16', but the name" in str(err.value)


def test_a_fixed_shape_backend_exports_a_decoder_one_token_per_call(tmp_path):
    (target,) = load_project(_project(tmp_path, GOOD_MODEL.replace('"xnnpack-fp32"', '"openvino-fp32"')))
    assert target.recipe.export.one_token
    (target,) = load_project(_project(tmp_path / "x", GOOD_MODEL))
    assert not target.recipe.export.one_token


def test_a_backend_that_cannot_lower_the_kind_is_refused_before_any_work(tmp_path):
    message = _recipe_problems(tmp_path / "vulkan", GOOD_MODEL, 'doc = "x"\nbackend = "vulkan"\n')
    assert "r.toml: backend: 'vulkan' cannot lower model m" in message and "FuseBatchNormPass" in message
    masked = GOOD_MODEL.replace('task = "causal-lm"', 'task = "masked-lm"').replace('prompts = ["hi"]', 'prompts = ["hi <mask>"]')
    message = _recipe_problems(tmp_path / "openvino", masked, 'doc = "x"\nbackend = "openvino"\n')
    assert "r.toml: backend: 'openvino' cannot lower model m" in message and "dynamic length" in message
    message = _recipe_problems(tmp_path / "half", IMAGE_MODEL, 'doc = "x"\nbackend = "xnnpack"\ndtype = "bfloat16"\n')
    assert "r.toml: dtype: 'bfloat16': model m" in message and "take float inputs" in message
