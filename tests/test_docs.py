"""README and docs/: every relative link (and its anchor) resolves, every repository path they name exists, and they
speak to users (no development history such as issue numbers)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PATH = re.compile(r"(?<![\w./<-])((?:configs|scripts|bench|tests|docs|rundir|optim|evaluation|training|deploy|models|losses|augment|core|tables)"
                  r"/[\w./-]*[\w/]|(?:pretrain|finetune|reproduce|export|explain)\.py)(?![\w<*{])")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped (not - or _), spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_named_paths_resolve(page):
    text = page.read_text()
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link to missing {target}"
        if anchor:
            assert anchor in anchors(resolved), f"{page.name}: no heading #{anchor} in {resolved.name}"
    for path in set(PATH.findall(text)):
        assert (REPO / path).exists(), f"{page.name} names {path}, which does not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_speak_to_users(page):
    assert not re.search(r"\bissues? \d+", page.read_text(), flags=re.I), page.name


def test_the_readme_stays_short_and_maps_every_guide():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    guides = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert guides and all(f"docs/{name}" in readme for name in guides)
