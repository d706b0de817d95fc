"""keys: canonical encoding, pinned digest, stat-cached file hashing."""

from __future__ import annotations

import os

import pytest

from xportbuild import keys


def test_pinned_digest_changes_only_deliberately():
    # If this fails, key construction changed: every cache entry is invalidated. Bump keys.SCHEMA too.
    assert keys.digest_value({"b": [1, 2.5, "x"], "a": None}) == "eae3dd25faeaa96d4f79c0db7f766610"


def test_canonical_json_ignores_key_order():
    assert keys.canonical_json({"a": 1, "b": {"d": 2, "c": 3}}) == keys.canonical_json({"b": {"c": 3, "d": 2}, "a": 1})


def test_nan_cannot_enter_a_key():
    with pytest.raises(ValueError, match="non-finite"):
        keys.digest_value({"tol": float("nan")})


def test_a_key_holds_public_versions_and_the_manifest_the_whole_one():
    assert keys.public_versions({"torch": "2.13.0+cpu", "executorch": "1.4.1"}) == \
        {"torch": "2.13.0", "executorch": "1.4.1"}
    assert keys.public_versions({"torch": "2.13.0+cu128"}) == keys.public_versions({"torch": "2.13.0"})


def test_library_versions_do_not_import_libraries():
    import sys

    versions = keys.library_versions(("xxhash", "surely-not-installed-pkg"))
    assert versions["surely-not-installed-pkg"] == "absent"
    assert "surely-not-installed-pkg" not in sys.modules


def _node(stage: str, task: str = "causal-lm", backend: str = "xnnpack"):
    from xportbuild.plan import StageNode

    params = {"task": task}
    if stage == "lower":
        params["lower"] = {"backend": backend}
    return StageNode(stage, "x", params)


CASES = [("fetch", "causal-lm"), ("reference", "causal-lm"), ("quantize", "causal-lm"), ("lower", "causal-lm"),
         ("verify", "causal-lm"), ("program", "image-classification"), ("reference", "speech-recognition")]


@pytest.mark.parametrize("stage, task", CASES, ids=[f"{s}-{t}" for s, t in CASES])
def test_a_stage_key_covers_every_module_it_imports_and_no_other(tmp_path, stage, task):
    """Edit each module of the package, one at a time, in a copy: the stage's code digests change exactly when the
    edited module is in its import closure, and every module it runs is."""
    import shutil

    from xportbuild.pipeline import code_roots

    package = tmp_path / "xportbuild"
    shutil.copytree(keys.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    roots = code_roots(_node(stage, task))
    closure = keys.import_closure(roots, package)
    before = keys.code_digests(roots, package)
    modules = sorted(p.relative_to(tmp_path).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
                     for p in package.rglob("*.py"))
    for module in modules:
        path = keys.package_module_file(module, package)
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        changed = keys.code_digests(roots, package) != before
        path.write_bytes(original)
        assert changed == (module in closure), f"{stage} ({task}): editing {module} " + (
            "did not change its key" if module in closure else "changed its key, but it does not import it")
    assert len(closure) < len(modules), "every module in every key: an edit anywhere would rebuild everything"


def test_the_modules_a_stage_runs_are_in_its_key():
    """The ones a hand-written list once missed: the kind's shared helpers, the inputs generator, the backend."""
    from xportbuild.pipeline import code_roots

    assert "xportbuild.models.common" in keys.import_closure(code_roots(_node("quantize")))
    assert "xportbuild.models.inputs" in keys.import_closure(code_roots(_node("reference", "image-classification")))
    lower = keys.import_closure(code_roots(_node("lower")))
    assert "xportbuild.backends.xnnpack" in lower and "xportbuild.backends.portable" not in lower
    assert "xportbuild.models.seq2seq" not in keys.import_closure(code_roots(_node("verify")))
