"""Every relative link of README.md and docs/*.md points at a file that exists, and at a heading of it
when it names one (GitHub's anchors), so a reader who follows the README never lands on a 404."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The Markdown without code blocks and code spans, where link syntax is only text."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text(encoding="utf-8")))


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces to
    hyphens, and -1, -2, ... for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for title in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken(page: Path, root: Path = ROOT) -> list[str]:
    """Each link of the page that does not resolve, with why."""
    problems = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ... are not checked here
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        rel = dest.relative_to(root).as_posix() if dest.is_relative_to(root) else str(dest)
        if not dest.exists():
            problems.append(f"{target}: no file {rel}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: {rel} has no heading with the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    assert links(page) or page.name != "README.md", "the README links to nothing"
    assert broken(page) == []


def test_the_readme_links_every_page_of_docs():
    readme = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    assert [p.name for p in PAGES[1:] if p.resolve() not in readme] == []


def test_the_checker_sees_what_is_broken(tmp_path):
    """The checker itself: a missing file, a missing heading, repeated headings, links in code (not checked)."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Title: `b` page\n\n## Same\n\n## Same\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/b.md#title-b-page) [ok](docs/b.md#same-1) [ok](#top) ![x](docs/none.png)\n"
                    "[no](docs/b.md#other) `[code](docs/none.md)`\n```\n[code](none.md)\n```\n# Top\n")
    assert broken(page, tmp_path) == ["docs/none.png: no file docs/none.png",
                            "docs/b.md#other: docs/b.md has no heading with the anchor #other"]


def test_the_readme_python_example_runs_as_printed(demo_sized_export, tmp_path, monkeypatch, capsys):
    """The README's example, on the demo-sized model, with one readable image and one that is not."""
    from PIL import Image

    from captrt.runtime import Captioner
    from tests.conftest import random_images

    model = demo_sized_export[0]
    [block] = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    assert '"demo_out/model"' in block and '["a.jpg", "b.png"]' in block
    monkeypatch.chdir(tmp_path)
    Image.fromarray(random_images(1, seed=5)[0]).save("a.jpg", quality=92)
    (tmp_path / "b.png").write_bytes(b"not a png")
    exec(compile(block.replace('"demo_out/model"', repr(str(model))), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    with Captioner.load(model) as captioner:
        [a] = captioner.caption([str(tmp_path / "a.jpg")], beam_size=5)
    assert printed[0].startswith(f"{a.text} {a.score} (") and printed[0].endswith(", 8, 8)")
    assert printed[1].startswith("could not read it: ") and "b.png" in printed[1]
    assert len(printed) == 2
