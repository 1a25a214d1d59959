"""Every relative link in the project's Markdown (README, docs/, bench/README.md, CONTRIBUTING)
leads somewhere: the file exists, and a ``#fragment`` names a heading of the file it points to
(GitHub's anchors). README stays a front door: short, its two commands first."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted(
    [REPO / "README.md", REPO / "CONTRIBUTING.md", REPO / "bench" / "README.md"]
    + list((REPO / "docs").glob("*.md"))
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _outside_code(text: str) -> str:
    """The text without fenced code blocks or inline code (a link there is not a link)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M).splitlines():
        m = re.match(r"^#{1,6} (.+)$", line)
        if m:
            a = anchor(m.group(1))
            n = seen.get(a, 0)
            seen[a] = n + 1
            found.add(a if n == 0 else f"{a}-{n}")
    return found


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in LINK.findall(_outside_code(page.read_text())):
        if re.match(r"^[a-z]+:", target):  # http(s), mailto: not ours to check offline
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            bad.append(f"{target}: no such heading in {dest.name}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_leads_somewhere(page):
    assert broken_links(page) == []


def test_a_broken_link_or_anchor_is_found(tmp_path):
    """The check can fail: a missing file and a missing heading are both reported."""
    (tmp_path / "other.md").write_text("# A heading, with punctuation\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-heading-with-punctuation) [gone](missing.md) [bad](other.md#nope)\n"
        "`[in code](missing.md)` and [here](#local)\n\n## Local\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nope: no such heading in other.md",
    ]


def test_readme_is_a_front_door():
    """Two commands first, then a map; the lab notebook lives in docs/ and bench/."""
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    first = [h for h in text.splitlines() if h.startswith("## ")][0]
    assert first == "## Two commands"
    for page in (REPO / "docs").glob("*.md"):
        assert f"docs/{page.name}" in text, f"README does not lead to docs/{page.name}"
    assert "../shared" not in text  # nothing outside the repository
