"""The checkout stays clean: what tox, pytest and the demo leave behind is ignored by git."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "path",
    [
        ".venv",  # tox writes a `.venv` *file* (a bare `.venv/` pattern misses it)
        ".venv/bin/python",
        ".tox/py311/log",
        "src/semiseg/__pycache__/cli.cpython-311.pyc",
        "src/napari_semiseg.egg-info/PKG-INFO",
        ".pytest_cache/v/cache/nodeids",
        ".coverage",
        ".coverage.host.1234",
        "htmlcov/index.html",
        "coverage.xml",
        ".hypothesis/examples/x",
        ".ruff_cache/content",
        "demo-output/mask.tif",
        "build/lib/semiseg/cli.py",
        "dist/napari_semiseg-0.1.0.tar.gz",
    ],
)
def test_gitignore_covers_what_the_tools_leave(path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    # --no-index: the patterns alone decide (also for paths that do not exist).
    res = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT)
    assert res.returncode == 0, f"{path} is not ignored by .gitignore"


@pytest.mark.parametrize("path", ["src/semiseg/cli.py", "tests/test_cli.py", "docs/benchmarks.md", "tox.ini"])
def test_gitignore_keeps_the_sources(path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    res = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT)
    assert res.returncode == 1


def _extras() -> dict[str, set[str]]:
    """``[options.extras_require]`` of setup.cfg: extra -> requirement names (lower case)."""
    import configparser
    import re

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    out = {}
    for extra, text in cfg["options.extras_require"].items():
        reqs = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        out[extra] = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in reqs}
    return out


def test_readme_install_names_existing_extras_and_the_cpu_torch_build():
    import re

    readme = (ROOT / "README.md").read_text()
    extras = _extras()
    named = set(re.findall(r'napari-semiseg\[([\w,-]+)\]', readme)) | set(re.findall(r'"\.\[([\w,-]+)\]"', readme))
    assert {"qt", "napari"} <= {e for n in named for e in n.split(",")}
    for group in named:
        for extra in group.split(","):
            assert extra in extras, f"README names the extra [{extra}], setup.cfg has {sorted(extras)}"
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in readme
    assert 'pip install -e ".[qt]"' in readme  # the from-checkout line
    # [qt] is [napari] plus a Qt binding, not a different set of packages.
    assert extras["napari"] <= extras["qt"] and "napari" in extras["qt"]
    guide = (ROOT / "docs" / "user-guide.md").read_text()
    for group in re.findall(r'napari-semiseg\[([\w,-]+)\]', guide):
        assert all(e in extras for e in group.split(",")), group
