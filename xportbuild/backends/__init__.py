"""Backends a recipe can name: a literal registry from name to the module that holds everything about it.

A backend module defines (without importing torch or ExecuTorch at import time, so validate and `doit list` stay
light):
- `DELEGATE`: the backend id its delegates carry in a .pte, which the runtime must have registered to run it (None:
  no delegate);
- `RUNS_ON`: where a runtime with that backend lives, for the message on a machine without it;
- `partitioners(options, per_op_mode) -> list`, unless it is refused for every model (`refusal`): what lowering
  delegates to it (empty: portable kernels run everything);

and, where it differs from the defaults the accessors below give:
- `DTYPES`: the dtypes a program may compute in for it (float32);
- `PER_OP_MODE`: whether it can partition op by op (no);
- `GROUP_SCALE_DTYPE`: the dtype it stores group-wise weight scales in (float32; quantize rounds with it, so the
  program verified against computes what the delegate computes);
- `weight_problem(scheme, group_size) -> (knob, message) | None`: why a linear quantization scheme cannot run on it;
- `Options`: a frozen dataclass of its recipe knobs (`[lower.options]`), with their defaults;
- `PACKAGES`: distributions it lowers or runs with beyond the fixed stack (their versions enter the lower and verify
  keys and the provenance), and `EXTRA`: the pyproject extra that installs them;
- `unavailable() -> str | None`: why it cannot lower on this machine (a package missing or of the wrong version);
- `refusal(task) -> str | None`: why it cannot lower a model of that task kind at all;
- `runtime_facts() -> dict`: what the report records of the runtime that ran it (e.g. the precision it chose);
- `CI_RUNNER`: the GitHub Actions runner whose runtime has it (default: Linux);
- `FIXED_SHAPES`: it lowers fixed input shapes only (default: False).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from types import ModuleType

# The ExecuTorch version the lowering shortcuts (shortcuts.py: retrace.py, decompose.py, patterns.py, fake_values.py,
# lazy_code.py, provenance.py, cia_ops.py) were checked against, byte for byte: on another version lowering runs unpatched.
CHECKED_EXECUTORCH = "1.4.1"

REGISTRY: dict[str, str] = {
    "xnnpack": "xportbuild.backends.xnnpack",
    "portable": "xportbuild.backends.portable",
    "openvino": "xportbuild.backends.openvino",
    "coreml": "xportbuild.backends.coreml",
    "vulkan": "xportbuild.backends.vulkan",
    "qnn": "xportbuild.backends.qnn",
}


def backend(name: str) -> ModuleType:
    """The module of backend `name`."""
    if name not in REGISTRY:
        raise KeyError(f"unknown backend {name!r}: use one of {', '.join(sorted(REGISTRY))}")
    return importlib.import_module(REGISTRY[name])


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A backend without knobs of its own."""


def dtypes(name: str) -> tuple[str, ...]:
    return getattr(backend(name), "DTYPES", ("float32",))


def per_op_mode(name: str) -> bool:
    return getattr(backend(name), "PER_OP_MODE", False)


def group_scale_dtype(name: str) -> str:
    return getattr(backend(name), "GROUP_SCALE_DTYPE", "float32")


def weight_problem(name: str, scheme: str, group_size: int) -> tuple[str, str] | None:
    check = getattr(backend(name), "weight_problem", None)
    return check(scheme, group_size) if check else None


def options_class(name: str) -> type:
    return getattr(backend(name), "Options", NoOptions)


def packages(name: str) -> tuple[str, ...]:
    return getattr(backend(name), "PACKAGES", ())


def unavailable(name: str) -> str | None:
    """Why backend `name` cannot lower on this machine (None: it can)."""
    check = getattr(backend(name), "unavailable", None)
    return check() if check else None


def unavailable_here(names: tuple[str, ...]) -> str:
    """What the backends `names` lack on this machine ("" when they can all lower here)."""
    return "; ".join(f"{name}: {why}" for name in names if (why := unavailable(name)))


def refusal(name: str, task: str) -> str | None:
    """Why backend `name` cannot lower a model of task kind `task` (None: it can)."""
    check = getattr(backend(name), "refusal", None)
    return check(task) if check else None


def fixed_shapes(name: str) -> bool:
    """Whether backend `name` lowers fixed input shapes only (`FIXED_SHAPES`): a decoder is then exported for one
    token per call."""
    return getattr(backend(name), "FIXED_SHAPES", False)


def sequence_refusal(task: str, why: str) -> str | None:
    """For a backend that lowers fixed input shapes only: the refusal of a kind whose methods take a sequence of
    dynamic length and cannot be exported one token per call."""
    from xportbuild.models.kinds import KINDS

    if not KINDS[task].has_sequence or KINDS[task].token_by_token:
        return None
    fixed = ", ".join(kind.task for kind in KINDS.values() if not kind.has_sequence or kind.token_by_token)
    return (f"a {task} program takes a sequence of dynamic length, and {why}; it lowers {fixed} models (fixed input "
            "shapes, or a decoder one token per call)")


LINUX_RUNNER = "ubuntu-latest"


def ci_runner(names: tuple[str, ...]) -> str:
    """The GitHub Actions runner whose ExecuTorch runtime runs every backend of a recipe (a module's `CI_RUNNER`)."""
    runners = {getattr(backend(name), "CI_RUNNER", LINUX_RUNNER) for name in names}
    return (runners - {LINUX_RUNNER} or {LINUX_RUNNER}).pop()


def runtime_facts(name: str) -> dict:
    facts = getattr(backend(name), "runtime_facts", None)
    return facts() if facts else {}


def partitioners(lower) -> list:
    """The partitioners of a LowerSpec: its backend's, then its fallback's (which take what the first left)."""
    found = []
    for name in lower.backends:
        options = lower.options if name == lower.backend else default_options(name)
        found += backend(name).partitioners(options_class(name)(**options), lower.per_op_mode)
    return found


def default_options(name: str) -> dict:
    return dataclasses.asdict(options_class(name)())


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of the backends' packages, from package metadata (nothing imported)."""
    versions = {}
    for name in names:
        for package in packages(name):
            try:
                versions[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                versions[package] = "absent"
    return versions


def version_problem(package: str, wanted: str, extra: str) -> str | None:
    """Why `package` is not usable: absent, or not of the version series `wanted` (a prefix such as "2025."), with
    the install that brings it (the project's extra `extra`, or the project itself)."""
    install = f"pip install -e '.[{extra}]'" if extra else "pip install -e ."
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return f"{package} is not installed: {install}"
    if not version.startswith(wanted):
        return f"{package} {version} is installed, it needs {wanted}x: {install}"
    return None


def missing_delegates(pte_delegates: set[str]) -> set[str]:
    """The backend ids among `pte_delegates` this ExecuTorch runtime has not registered."""
    from executorch.extension.pybindings.portable_lib import _get_registered_backend_names

    return set(pte_delegates) - set(_get_registered_backend_names())


def by_delegate(delegate: str) -> ModuleType | None:
    """The backend module whose delegates carry the id `delegate`."""
    return next((backend(name) for name in REGISTRY if backend(name).DELEGATE == delegate), None)


def executorch_is_checked() -> bool:
    from executorch.version import __version__

    return __version__.split("+")[0] == CHECKED_EXECUTORCH
