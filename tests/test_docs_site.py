"""The documentation site (mkdocs.yml, docs/): `mkdocs build --strict` passes offline, every nav page is built, and
the landing and how-to pages carry the README's quick start commands word for word."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from support import REPO

NAV_PAGES = [
    "index.md",
    "howto.md",
    "design.md",
    "algorithms.md",
    "performance.md",
    "scale.md",
    "reliability.md",
    "deployments.md",
]


def readme_quick_start() -> list[str]:
    """The command lines of the first ```bash block under README.md's "## Quick start"."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block, "README.md: no ```bash block under ## Quick start"
    return [line for line in block.group(1).splitlines() if line.strip()]


def page_text(page_html: str) -> str:
    """The visible text of a built page: tags dropped (highlighted code is split into spans), entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", page_html))


def built_path(site: Path, page: str) -> Path:
    """Where mkdocs (use_directory_urls) writes a page: index.md → index.html, howto.md → howto/index.html."""
    return site / "index.html" if page == "index.md" else site / Path(page).stem / "index.html"


def test_docs_site_builds_strict_with_every_nav_page(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    assert [next(iter(entry.values())) for entry in config["nav"]] == NAV_PAGES
    assert not config.get("plugins") or config["plugins"] == ["search"], "no plugin that downloads at build time"

    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml")]
        + ["--site-dir", str(site)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output

    for page in NAV_PAGES:
        assert built_path(site, page).is_file(), f"{page} was not built"

    commands = readme_quick_start()
    assert len(commands) == 2, commands
    for page in ("index.md", "howto.md"):
        text = page_text(built_path(site, page).read_text(encoding="utf-8"))
        for command in commands:
            assert command in text, f"{page}: the README's quick start command is missing: {command}"
