"""The pages show what their results files say: every generated table is up to date, and every relative link resolves."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_generated_table_matches_its_results_file():
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_table_typed_by_hand_is_caught(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import generate
    finally:
        sys.path.remove(str(ROOT / "docs"))
    page = tmp_path / "page.md"
    page.write_text("x\n<!-- table:evaluator-negatives -->\n| made | up |\n<!-- /table:evaluator-negatives -->\n")
    text, changed = generate.Page(page).regenerate()
    assert changed == ["evaluator-negatives"] and "| made | up |" not in text and "| plain |" in text


def anchors(page: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation dropped, spaces to hyphens, a repeat
    numbered."""
    import re

    seen: dict[str, int] = {}
    found = set()
    in_code = False
    for line in page.read_text().splitlines():
        in_code ^= line.startswith("```")
        heading = re.match(r"#{1,6} (.*)", line)
        if heading and not in_code:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def test_every_relative_link_and_anchor_in_the_pages_resolves():
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a web address: not checked offline
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_anchors_are_githubs(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Resist: erasure (trained)\n```\n# not a heading\n```\n## H2: closeness\n## H2: closeness\n")
    assert anchors(page) == {"resist-erasure-trained", "h2-closeness", "h2-closeness-1"}
