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


def commands_in_pages() -> list[tuple[str, list[str], list[str]]]:
    """Every `relapse ...` the pages show (code spans and the lines of shell blocks): its page, its command words, the
    flags it uses. The measurements page is left out: it records each command as it was run."""
    import re

    found = []
    for page in [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "measurements.md")]:
        text = page.read_text()
        blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S))
        shown = re.findall(r"`(relapse [^`]+)`", text) + re.findall(r"^(relapse [^\n#]+)", blocks, re.M)
        for line in shown:
            words = line.replace("\\|", "|").split()[1:]
            path = []
            for word in words:
                if word.startswith("-") or not re.fullmatch(r"[a-z][a-z0-9|-]*", word):
                    break
                path.append(word)
            flags = sorted({m.group() for w in words if (m := re.match(r"--[a-z0-9-]+", w.lstrip("[(")))})
            for alternative in (path[-1].split("|") if path else []):
                found.append((page.name, [*path[:-1], alternative], flags))
    return found


def test_every_command_and_flag_the_pages_show_is_in_the_cli():
    from typer.testing import CliRunner

    from relapse.cli import app

    helps: dict[tuple, str] = {}
    missing = []
    for page, path, flags in commands_in_pages():
        key = tuple(path)
        if key not in helps:
            result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
            helps[key] = result.output if result.exit_code == 0 else ""
        if not helps[key]:
            missing.append(f"{page}: relapse {' '.join(path)} (no such command)")
        missing += [f"{page}: relapse {' '.join(path)} {flag}" for flag in flags if flag.lstrip("-") and f"{flag} " not in helps[key]
                    and f"{flag}\\n" not in helps[key] and f"{flag}/" not in helps[key]]
    assert not missing, missing
