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
