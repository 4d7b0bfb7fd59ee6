"""A study's report.html in headless Chromium (Debian's chromium and chromium-driver, which `make test`
installs through `make browser`): it renders, every image loads, no script fails and nothing is fetched."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from relapse.study.run import StudyRunConfig, run_study

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# The network is closed on the test machines: Chromium must not try to reach Google's services.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,900"]
# Runs before any script of the page: uncaught errors and rejections land in window.__errors.
ERROR_HOOK = """window.__errors = [];
window.addEventListener('error', e => window.__errors.push('error: ' + (e.message || e)));
window.addEventListener('unhandledrejection', e => window.__errors.push('unhandled rejection: ' + e.reason));"""
SEEN = """return {title: document.title, text: document.body.innerText,
  tables: [...document.querySelectorAll('table')].map(t => t.rows.length),
  images: [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth})),
  errors: window.__errors, resources: performance.getEntriesByType('resource').map(e => e.name),
  height: document.documentElement.scrollHeight};"""


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model_dir, tiny_evaluator_dir) -> Path:
    """report.html of a real study, the smallest that draws every part: two defenses, a fine-tune with
    three scored steps (curves), a quality set (scatter) and images (grid); one sampling step, no guidance."""
    tmp = tmp_path_factory.mktemp("study")
    (tmp / "harm.txt").write_text("a checkered red star\n")
    (tmp / "clean.txt").write_text("a red star\n")
    config = {
        "name": "tiny", "model": str(tiny_model_dir), "seeds": [0],
        "prompt_sets": {"harm": {"source": str(tmp / "harm.txt")}, "clean": {"source": str(tmp / "clean.txt")}},
        "defenses": {"none": [], "esd": [{"method": "esd", "concept": ["a checkered red star"], "steps": 1, "batch_size": 1, "sample_steps": 2}]},
        "before": ["harm", "clean"],
        "scenarios": {"malicious": {"finetune": {"data": "toy:harmful:2", "method": "lora", "steps": 2, "save_at": [1], "batch_size": 1},
                                    "prompt_sets": ["harm"], "quality_sets": ["clean"]}},
        "sampler": {"steps": 1, "guidance": 0, "images_per_prompt": 1},
        "detectors": [{"name": "toy", "options": {"weights": str(tiny_evaluator_dir)}}],
    }
    (tmp / "study.yaml").write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RELAPSE_CACHE", str(tmp / "cache"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        return run_study(StudyRunConfig(config=tmp / "study.yaml", out=tmp / "run")) / "report.html"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: run `make browser` (installs Debian's chromium and chromium-driver)", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: pip install -e '.[dev]' (or `make setup`)", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # Debian's, and Debian's driver below: Selenium Manager downloads nothing
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_HOOK})
    yield driver
    driver.quit()


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
