"""xportbuild: Hugging Face models to verified ExecuTorch programs, as cached build targets."""

__version__ = "0.1.0"


def load(artifact):
    """A published artifact (its artifacts/<target> folder or its .pte) as its kind's app object, with the kind's
    natural call (generate, fill_mask, classify, transcribe, embed): see xportbuild.app."""
    from xportbuild.app import load as load_artifact

    return load_artifact(artifact)
