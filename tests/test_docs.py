"""The README and docs/: the configuration reference matches the config schema, every relative link
(and #anchor) resolves, the README stays a short front door that names every page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from transrec.config.markdown import COMMAND, render

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)")
MAX_README_LINES = 250


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks, inline code spans removed."""
    fence = None
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*(```|~~~)", line)
        if m:
            fence = None if fence == m.group(1) else (fence or m.group(1))
            continue
        if fence is None:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(path.read_text()):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(2))
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.add(base if k == 0 else f"{base}-{k}")
    return out


def links(path: Path):
    for n, line in _prose_lines(path.read_text()):
        for m in LINK.finditer(re.sub(r"`[^`\n]*`", "", line)):  # [`x`](target) keeps its target
            yield n, m.group(2)


def test_configuration_reference_is_current():
    path = DOCS / "configuration.md"
    assert path.is_file(), f"docs/configuration.md is missing: generate it with `{COMMAND}`"
    assert path.read_text() == render(), (
        f"docs/configuration.md is stale (the config dataclasses changed): regenerate it with `{COMMAND}`")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for n, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        where = f"{page.relative_to(ROOT)}:{n}: {target}"
        if not dest.exists():
            bad.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
        elif anchor and dest.suffix != ".md":
            bad.append(f"{where}: an anchor into a file that is not Markdown")
    assert not bad, "\n".join(bad)


def test_readme_is_a_short_front_door():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, (f"README.md has {n} lines, at most {MAX_README_LINES}: move detail "
                                   "into docs/ and link it")


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README)}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_slug_follows_github():
    assert slug("GPU proof and benchmark") == "gpu-proof-and-benchmark"
    assert slug("Cold start: items never seen in training") == "cold-start-items-never-seen-in-training"
    assert slug("`model.text.lora`") == "modeltextlora"
    assert slug("Against the peers, one NVIDIA H200") == "against-the-peers-one-nvidia-h200"
