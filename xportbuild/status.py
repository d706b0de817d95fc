"""Every target at a glance: up to date or why not, what was published and how good it is. Reads the cache and
artifacts/ only (no pull from a remote, nothing built, no torch)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from xportbuild.build import Workspace
from xportbuild.errors import SourceNotHere, XportError
from xportbuild.plan import Plan
from xportbuild.publish import published_state, read_published
from xportbuild.report import human_bytes, with_interval


@dataclass(frozen=True)
class TargetStatus:
    target: str
    state: str  # "up to date", or why not: the earliest stale stage and what changed
    published_bytes: int | None
    top1: str
    kl: str
    decode_tokens_per_s: float | None
    published_at: float | None  # seconds since the epoch

    def row(self) -> list[str]:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.published_at)) if self.published_at else "-"
        speed = f"{self.decode_tokens_per_s:.1f}" if self.decode_tokens_per_s else "-"
        size = human_bytes(self.published_bytes) if self.published_bytes is not None else "-"
        return [self.target, self.state, size, self.top1, self.kl, speed, when]


COLUMNS = ["target", "state", "published", "top-1 vs float [95%]", "mean KL", "decode tok/s", "published at"]


def target_status(plan: Plan, workspace: Workspace, target: str) -> TargetStatus:
    state = _state(plan, workspace, target)
    published = read_published(workspace.artifacts_dir / target)
    if published is None:
        return TargetStatus(target, state, None, "-", "-", None, None)
    against = published.against_float
    return TargetStatus(target, state, published.size, with_interval(against, "top1", ".3f"),
                        f"{against['kl_mean']:.4f}" if "kl_mean" in against else "-",
                        published.runner.get("decode_tokens_per_s"), published.published_at)


def _state(plan: Plan, workspace: Workspace, target: str) -> str:
    try:
        fresh, reason = published_state(plan, workspace, target)
    except SourceNotHere as err:
        return f"needs a download: {err.download}"
    except XportError as err:
        return str(err).splitlines()[0]
    return "up to date" if fresh else reason.removeprefix(f"export:{target} is stale: ")


def status_table(plan: Plan, workspace: Workspace) -> str:
    """A text table of every target (the cache is only read: a remote is not consulted)."""
    local = dataclasses.replace(workspace, remote=None)
    rows = [COLUMNS, *(target_status(plan, local, target).row() for target in plan.targets)]
    widths = [min(max(len(row[i]) for row in rows), 100) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(_cell(cell, width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _cell(text: str, width: int) -> str:
    return text.ljust(width) if len(text) <= width else text[: width - 1] + "…"


def project_status(recipes_dir: Path) -> str:
    from xportbuild.plan import plan_targets
    from xportbuild.recipe import load_project

    return status_table(plan_targets(load_project(recipes_dir)), Workspace.for_project(recipes_dir))
