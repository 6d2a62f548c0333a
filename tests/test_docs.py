"""The documentation a user has: every relative link of the README and docs/ resolves inside
the repository (anchors included), and the code refers only to documents that exist."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(md: pathlib.Path) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces -> '-'."""
    out = set()
    for line in md.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_relative_links_of_readme_and_docs_resolve():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert (ROOT / "docs" / "ess.md") in docs
    checked = 0
    for md in docs:
        for target in LINK.findall(md.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            assert dest.is_file() and ROOT in dest.parents, f"{md.name}: link {target!r} leaves the repository"
            if anchor and dest.suffix == ".md":
                assert anchor in _anchors(dest), f"{md.name}: no heading for #{anchor} in {dest.name}"
            checked += 1
    assert checked >= 3


def test_code_and_readme_cite_only_documents_in_the_repository():
    sections = {int(m) for m in re.findall(r"^## (\d+)\.", (ROOT / "docs" / "ess.md").read_text(), re.M)}
    assert sections == {1, 2, 3, 4}
    files = [
        ROOT / "README.md",
        *ROOT.glob("docs/*.md"),
        *ROOT.glob("esswatch/**/*.py"),
        *ROOT.glob("integrations/**/*.py"),
        *ROOT.glob("examples/**/*.py"),
    ]
    cited = 0
    for f in files:
        text = f.read_text(encoding="utf-8")
        bad = re.search(r"ess-spec|\.\./shared/|\bspec sections?\b|\bthe spec\b|\bspec's\b", text, re.I)
        assert bad is None, f"{f.relative_to(ROOT)} mentions {bad.group(0)!r}"
        for n in re.findall(r"docs/ess\.md``?,? sections? (\d+)", text):
            assert int(n) in sections, f"{f.relative_to(ROOT)} cites docs/ess.md section {n}"
            cited += 1
    assert cited >= 8
