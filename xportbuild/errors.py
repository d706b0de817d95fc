"""The one exception tree of xportbuild: every failure a user can act on is one of these."""


class XportError(Exception):
    """Base of every error xportbuild raises on purpose."""


class ProblemList(XportError):
    """Several independent problems, all reported at once, one per line."""

    heading = "problems"

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"{self.heading}:\n" + "\n".join(f"  - {p}" for p in self.problems))


class RecipeError(ProblemList):
    """A model or recipe file is invalid; the message lists every problem found."""

    heading = "invalid recipes"


class ValidationFailed(ProblemList):
    """Recipes, sources or their combination cannot build; found before any stage ran. `summary`: what does build
    here and what needs a download first, said with the problems."""

    heading = "validation failed"

    def __init__(self, problems: list[str], summary: str = ""):
        self.summary = summary
        super().__init__(problems)


class FsckFound(ProblemList):
    """`fsck` found damage: each line says what, and what was done about it."""

    def __init__(self, problems: list[str], summary: str):
        self.heading = f"{summary}; found"
        super().__init__(problems)


class SourceError(XportError):
    """Weights or tokenizer could not be fetched from the declared source."""


class SourceNotHere(SourceError):
    """A hub source that is not in the local Hugging Face cache and cannot be downloaded now: not a problem of the
    project, a step to take (`download` names the command)."""

    def __init__(self, message: str, download: str):
        self.download = download
        super().__init__(message)


class StageError(XportError):
    """A stage could not produce its outputs, or its post-conditions do not hold."""


class RuntimeLacksBackend(StageError):
    """The .pte delegates to a backend this machine's ExecuTorch runtime does not have: it is lowered and cached,
    and verified where that runtime is."""


class VerifyFailed(XportError):
    """The lowered program does not agree with the reference within the recipe's tolerances."""

    def __init__(self, target: str, failures: list[str], numbers: dict | None = None,
                 accept: dict[str, float] | None = None, keep: tuple = ()):
        self.target = target
        self.failures = list(failures)
        self.numbers = numbers or {}
        self.accept = accept or {}  # tolerance -> the value that would have accepted these numbers
        self.keep = tuple(keep)  # the files that failed (the .pte), kept outside the cache for the user
        super().__init__(f"{target}: verification failed:\n" + "\n".join(f"  - {f}" for f in failures))


class CacheCorrupt(XportError):
    """A cache entry is present but does not match its recorded content."""


class DamagedEntry(XportError):
    """A stage could not read an input entry whose files match their hashes (an archive damaged before it was
    recorded, or by a tool that rewrote the record): the entry is discarded and rebuilt, not trusted again."""

    def __init__(self, entry_dir, reason: str):
        self.entry_dir = entry_dir
        super().__init__(f"{entry_dir}: unreadable ({reason})")
