"""The README and docs/ as a reader opens them: every relative link resolves to a file of the
repository (and every #anchor to a heading of its page), the README stays short, its first
lines are the two commands CI runs (.ci/run reads lines 2 and 3), and its ```python blocks run.

A ```python block that cannot run here (it needs a GPU, several processes, a download) has the
line `<!-- not run: why -->` just before it; it must still parse. The others of a page run in
order in one namespace, as a reader pasting them one after the other would."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set:
    """GitHub's anchors of the page's headings."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def _prose(text: str) -> str:
    """The page without its code blocks and inline code (`self.seq[0](x)` is no link)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


NOT_RUN = re.compile(r"<!-- not run: (\S.*?) -->")


def _python_blocks(page: Path) -> list:
    """(line of its first code line, code, why it is not run or None) for each ```python block."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = lines[i].strip()
        if not fence.startswith("```"):
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{page.name}: the code block at line {i + 1} is not closed"
        if fence == "```python":
            marker = NOT_RUN.fullmatch(lines[i - 1].strip()) if i else None
            blocks.append((i + 2, "\n".join(lines[i + 1:end]), marker.group(1) if marker else None))
        i = end + 1
    return blocks


PAGES_WITH_PYTHON = [page for page in PAGES if _python_blocks(page)]


@pytest.mark.parametrize("page", PAGES_WITH_PYTHON, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page):
    import torch

    torch.manual_seed(0)
    namespace = {"__name__": "__docs__"}
    for line, code, not_run in _python_blocks(page):
        # Line numbers as in the page, for the traceback.
        compiled = compile("\n" * (line - 1) + code, str(page), "exec")
        if not_run:
            continue
        try:
            exec(compiled, namespace)
        except Exception as e:
            raise AssertionError(f"{page.name}: the ```python block at line {line} raised {e!r}") from e


def test_not_run_markers_precede_python_blocks():
    pages = {page.name: page.read_text() for page in PAGES}
    markers = sum(len(NOT_RUN.findall(text)) for text in pages.values())
    skipped = [(page.name, line, why) for page in PAGES for line, _, why in _python_blocks(page) if why]
    assert markers == len(skipped), f"a <!-- not run: ... --> line not just before a ```python block: {skipped}"
    assert len(skipped) < sum(len(_python_blocks(page)) for page in PAGES), "every block is marked not run"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    links = LINK.findall(_prose(page.read_text()))
    assert links or page.name != "README.md", "the README links to its docs"
    for target in links:
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link {target!r} points to {resolved}, which does not exist"
        assert ROOT in resolved.parents or resolved == ROOT, f"{page.name}: link {target!r} leaves the repository"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{page.name}: no heading for #{anchor} in {resolved.name}"


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 120, len(lines)
    assert lines[0] == "```bash" and lines[3] == "```"
    assert "benchmarks/run.py" in lines[1] and "pytest" in lines[2]


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, page.name
