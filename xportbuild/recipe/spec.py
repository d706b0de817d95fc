"""Frozen, JSON-able specifications of models, recipes and the targets pairing them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from xportbuild.backends import REGISTRY as BACKENDS
from xportbuild.models.kinds import KINDS

SourceKind = Literal["hub", "local", "gguf"]
TaskKind = Literal[tuple(KINDS)]  # type: ignore[valid-type]  # the names come from the kinds table
Backend = Literal[tuple(BACKENDS)]  # type: ignore[valid-type]  # the names come from the backend registry
Fallback = Literal[("", *BACKENDS)]  # type: ignore[valid-type]
ComputeDtype = Literal["float32", "float16", "bfloat16"]
LinearScheme = Literal["none", "8da4w", "8da8w", "4w", "8w"]
LINEAR_SCHEMES = frozenset(get_args(LinearScheme)) - {"none"}  # the scheme tokens a recipe name can hold
EmbeddingScheme = Literal["none", "4w", "8w"]
HeadScheme = Literal["same", "none", "8da4w", "8da8w", "4w", "8w"]
QParamsAlgorithm = Literal["affine", "hqq"]
RoundingAlgorithm = Literal["none", "gptq"]
TiedTable = Literal["copies", "shared"]


@dataclass(frozen=True)
class SourceSpec:
    """Where weights come from. Exactly the fields of its kind are set.

    hub: repo + revision (a commit SHA is reproducible, a branch is not);
    local: path (a directory saved with save_pretrained), or package (an installed Python package shipping one, or
      a zip of one);
    gguf: path to a .gguf file, or package (an installed Python package shipping one).
    """

    kind: SourceKind
    repo: str = ""
    revision: str = ""
    path: str = ""
    package: str = ""


@dataclass(frozen=True)
class VerifyInputs:
    """What the model is verified on: prompts (text kinds), how many images or audio clips to generate (image and
    audio kinds), and how many greedy tokens to compare (generating kinds)."""

    prompts: tuple[str, ...] = ()
    max_new_tokens: int = 16
    samples: int = 2


@dataclass(frozen=True)
class ModelSpec:
    """A model: its weights source, task kind, sequence length (the longest input, and the static cache of
    generating kinds; unused by image classifiers) and verification inputs."""

    name: str
    doc: str
    task: TaskKind
    source: SourceSpec
    verify: VerifyInputs
    recipes: tuple[str, ...]
    max_seq_len: int = 0
    file: str = ""


@dataclass(frozen=True)
class QuantSpec:
    """torchao quantization of linears, the output head and embeddings; group size 0 means per-channel.

    `head` is the output projection (lm_head): "same" quantizes it like the other linears.
    `qparams` chooses weight scales without calibration data: min-max ("affine") or HQQ scale-only ("hqq").
    `tied_table`: when the model ties its embedding and output head, "shared" stores one 8-bit table that both
    read (the embedding lookup and the delegate's matmul), "copies" quantizes each on its own.
    `algorithm`: how linear weights are rounded onto their grid. "none" rounds each to nearest; "gptq" rounds
    column by column, moving each rounding error onto the columns not yet rounded, weighted by the layer's inputs
    on `calibration` (a text file, relative to the recipe file); `damping` is GPTQ's diagonal damping, a fraction
    of the inputs' mean square.
    """

    linear: LinearScheme = "none"
    linear_group_size: int = 32
    head: HeadScheme = "same"
    head_group_size: int = 0
    embedding: EmbeddingScheme = "none"
    embedding_group_size: int = 0
    qparams: QParamsAlgorithm = "affine"
    per_axis_fallback: bool = True
    tied_table: TiedTable = "copies"
    algorithm: RoundingAlgorithm = "none"
    calibration: str = ""
    damping: float = 0.01

    @property
    def head_scheme(self) -> str:
        return self.linear if self.head == "same" else self.head

    @property
    def head_groups(self) -> int:
        return self.linear_group_size if self.head == "same" else self.head_group_size

    @property
    def enabled(self) -> bool:
        return self.linear != "none" or self.embedding != "none" or self.head_scheme != "none"


@dataclass(frozen=True)
class ExportSpec:
    """How a model is exported: the dtype its program computes in (the recipe's top-level `dtype`: weights,
    activations and caches; verify still compares with the float32 model), and a decoder's attention: ExecuTorch's
    custom ops (`llama::custom_sdpa` reading a KV cache that `llama::update_cache` writes in [batch, position, head,
    dim] layout) or the model's own stock ops."""

    custom_sdpa: bool = False
    custom_kv_cache: bool = False
    dtype: ComputeDtype = "float32"
    # One token per call, for backends that lower fixed shapes only (derived from the recipe's backends).
    one_token: bool = False

    @property
    def custom_ops(self) -> tuple[str, ...]:
        """The llama:: ops the exported program must contain."""
        return (("update_cache",) if self.custom_kv_cache else ()) + (("custom_sdpa",) if self.custom_sdpa else ())


STOCK_OPS = ExportSpec()  # the model's own attention and cache ops: what kinds without custom attention export


@dataclass(frozen=True)
class LowerSpec:
    """Backend lowering options and extra graph passes (registry names or `module:attr`).

    `options`: the backend's own knobs (`[lower.options]`, every one with its value, defaults included);
    `fallback`: a second backend whose partitioner takes what the first one left (e.g. Core ML, then XNNPACK)."""

    backend: Backend
    passes: tuple[str, ...] = ()
    extract_delegate_segments: bool = True
    per_op_mode: bool = False
    fallback: Fallback = ""
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends it lowers with, in partitioning order: its backend, then its fallback if it names one."""
        return (self.backend, self.fallback) if self.fallback else (self.backend,)


@dataclass(frozen=True)
class Tolerances:
    """Verification thresholds.

    *_vs_program compare the .pte with the program it was lowered from (tight);
    the others compare the .pte with the float eager model (quantization loss included).
    Greedy tokens of the .pte must equal the program's; `greedy_tie_margin` (logits) admits a first
    difference only where the program itself ranks the two tokens within that margin; `neighbour_tie_margin`
    (cosine) the same for embeddings: a nearest neighbour other than the float model's only where the program ranks
    the two within it.
    `max_kl` bounds the mean KL divergence of the .pte's next-token distribution from the float model's, and
    `max_kl_vs_program` from its program's: pooled means, stable where worst-position numbers are not.
    """

    min_cosine: float = 0.99
    min_top1: float = 0.9
    max_abs: float = 1.0
    min_cosine_vs_program: float = 0.9999
    max_abs_vs_program: float = 0.05
    greedy_tie_margin: float = 0.0
    neighbour_tie_margin: float = 0.0
    max_kl: float = 100.0  # mean KL(float || .pte) per position, in nats
    max_kl_vs_program: float = 100.0  # mean KL(program || .pte) per position, in nats


@dataclass(frozen=True)
class RecipeSpec:
    """A recipe: backend, quantization, lowering options and tolerances."""

    name: str
    doc: str
    quantize: QuantSpec
    lower: LowerSpec
    tolerances: Tolerances
    file: str = ""
    export: ExportSpec = ExportSpec()
    # Per-method quantization ([quantize.<method>] tables), e.g. an encoder kept at 8 bits under a 4-bit decoder.
    method_quantize: tuple[tuple[str, QuantSpec], ...] = ()

    def quantize_for(self, method: str) -> QuantSpec:
        return dict(self.method_quantize).get(method, self.quantize)


@dataclass(frozen=True)
class Target:
    """A model paired with a recipe; `tolerances` already carries the model's overrides."""

    name: str
    model: ModelSpec
    recipe: RecipeSpec
    tolerances: Tolerances


def as_dict(spec) -> dict:
    """A spec as plain JSON-able data (tuples become lists)."""
    return dataclasses.asdict(spec)


def resolve_relative(base_file: str, path: str) -> Path:
    """A path from a recipe file, relative to that file's folder unless absolute."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (Path(base_file).parent / p)
