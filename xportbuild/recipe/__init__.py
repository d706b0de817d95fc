"""Model and recipe specifications: frozen dataclasses loaded from human-written TOML."""

from xportbuild.recipe.load import load_project
from xportbuild.recipe.spec import (
    LowerSpec,
    ModelSpec,
    QuantSpec,
    RecipeSpec,
    SourceSpec,
    Target,
    Tolerances,
    VerifyInputs,
)

__all__ = [
    "LowerSpec",
    "ModelSpec",
    "QuantSpec",
    "RecipeSpec",
    "SourceSpec",
    "Target",
    "Tolerances",
    "VerifyInputs",
    "load_project",
]
