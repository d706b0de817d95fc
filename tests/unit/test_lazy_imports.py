"""`doit list` and the doit wiring must never import the heavy libraries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "torchao", "executorch")


def test_doit_list_imports_no_heavy_library():
    code = (
        "import sys\n"
        "from doit.doit_cmd import DoitMain\n"
        "from doit.cmd_base import ModuleTaskLoader\n"
        "import dodo\n"
        "rc = DoitMain(ModuleTaskLoader(dodo)).run(['list', '--all'])\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "export:gemma3-xnnpack-8da8w-shared" in result.stdout
    assert "HEAVY []" in result.stdout


def test_status_and_compare_import_no_heavy_library():
    """`python -m xportbuild status` reads the cache and artifacts/ only: it must stay instant on any project."""
    code = (
        "import sys\n"
        "from xportbuild.__main__ import main\n"
        "rc = main(['status', 'recipes'])\n"
        "main(['compare', 'recipes'])  # 2 where nothing is published yet\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "gemma3-xnnpack-8da8w-shared" in result.stdout and "HEAVY []" in result.stdout
