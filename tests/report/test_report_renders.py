"""A study's report.html in headless Chromium (Debian's chromium and chromium-driver, which `make test`
installs through `make browser`): it renders, every image loads, no script fails and nothing is fetched."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SEEN = """return {title: document.title, text: document.body.innerText,
  tables: [...document.querySelectorAll('table')].map(t => t.rows.length),
  images: [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth})),
  errors: window.__errors, resources: performance.getEntriesByType('resource').map(e => e.name),
  height: document.documentElement.scrollHeight};"""


@pytest.fixture(scope="module")
def report(tiny_study) -> Path:
    return tiny_study / "report.html"


def open_page(driver, page: Path) -> tuple[dict, list[str]]:
    """Load PAGE from file://; what it shows, and every problem: an image that did not load, the
    number of images not that of <img> tags in the file, a script error, a SEVERE console entry, a
    request for anything but the file itself or data: URLs."""
    for log in ("browser", "performance"):
        driver.get_log(log)  # drop what earlier pages left
    driver.get(page.as_uri())
    seen = driver.execute_script(SEEN)
    problems = [f"script error: {e}" for e in seen["errors"]]
    problems += [f"console: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    tags = len(re.findall(r"<img\b", page.read_text(), flags=re.IGNORECASE))
    if len(seen["images"]) != tags:
        problems.append(f"{len(seen['images'])} images in the page, {tags} <img> tags in the file")
    problems += [f"image did not load: {i['alt']!r}" for i in seen["images"] if not (i["complete"] and i["width"] > 0)]
    requests = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    urls = [m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"] + seen["resources"]
    problems += [f"network request: {u[:80]}" for u in urls if u != page.as_uri() and not u.startswith("data:")]
    return seen, problems


def test_report_renders_in_chromium_with_every_image_and_no_error(browser, report, tmp_path):
    seen, problems = open_page(browser, report)
    assert problems == []
    assert seen["title"] == "relapse: tiny" and "relapse study: tiny" in seen["text"]
    assert "How much of the erased concept comes back" in seen["text"] and "Quality vs safety" in seen["text"]
    # a header and one row per defense; the weight-space table has aligned defenses only (esd, not none)
    assert seen["tables"] and sorted(seen["tables"]) == [2] + [3] * (len(seen["tables"]) - 1)
    assert len(seen["images"]) >= 3  # curves, scatter, grid
    browser.set_window_size(1280, min(seen["height"] + 200, 6000))  # the whole page in one screenshot
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 20 and (pixels < 200).mean() > 0.02  # not blank: text, tables and figures drawn


def _corrupt_first_image(page: str) -> str:
    start = page.index("base64,") + len("base64,")
    return page[:start] + "AAAA" + page[start + 4:]  # PNG signature gone: the image cannot decode


@pytest.mark.parametrize("change, problem", [
    (_corrupt_first_image, "image did not load"),
    (lambda page: page.replace("</body>", "<script>null.boom()</script></body>"), "script error"),
    (lambda page: page.replace("</body>", "<script>Promise.reject(new Error('late'))</script></body>"), "script error: unhandled rejection"),
    (lambda page: page.replace("</body>", "<img alt='remote' src='http://127.0.0.1:9/x.png'></body>"), "network request"),
], ids=["corrupt image", "throwing script", "rejected promise", "remote image"])
def test_the_checks_catch_a_broken_report(browser, report, tmp_path, change, problem):
    broken = tmp_path / "report.html"
    broken.write_text(change(report.read_text()))
    _, problems = open_page(browser, broken)
    assert any(p.startswith(problem) for p in problems), problems
    _, problems = open_page(browser, report)
    assert problems == []  # the checks are not left tripped for the next page
