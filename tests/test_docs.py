"""The documentation builds with `mkdocs build --strict`, with the generated reference pages complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imgclf.config import parameter_table

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path: Path):
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    parameters = (site / "parameters" / "index.html").read_text(encoding="utf-8")
    for section, name, *_ in parameter_table():
        assert f'id="{section}"' in parameters and f"<code>{name}</code>" in parameters, name
    cli = (site / "cli" / "index.html").read_text(encoding="utf-8")
    for command in ("imgclf train", "imgclf runs compare", "imgclf runs list", "imgclf runs ui"):
        assert f'<h2 id="{command.replace(" ", "-")}">{command}' in cli, command
    for page in ("getting-started", "data", "tuning", "tracking", "deployment", "data-tools", "finetuning"):
        assert (site / page / "index.html").is_file(), page


def test_wheel_holds_the_pages_and_the_type_marker(tmp_path: Path):
    """The wheel carries the web pages and py.typed (without it, type checkers saw every imgclf name as Any)."""
    import shutil
    import zipfile

    src = tmp_path / "src"  # a copy: a build/ folder left in the checkout would hold earlier files
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src)
    cmd = [sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path]
    subprocess.run(cmd, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("imgclf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"imgclf/py.typed", "imgclf/ui/static/app.js", "imgclf/serving/static/index.html"} <= names
