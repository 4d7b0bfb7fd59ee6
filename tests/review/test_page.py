"""`relapse review` end to end, as a person uses it: the real command serves the page, Chromium labels images by key
presses, the page survives a reload and the server a restart, and the report shows the labels."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from relapse.review.labels import LabelStore


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Served:
    """`relapse review RUN` in its own process, stopped as a person stops it (Ctrl-C)."""

    def __init__(self, run, port: int):
        self.process = subprocess.Popen([sys.executable, "-m", "relapse.cli", "review", str(run), "--port", str(port)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=1)
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the server did not start: {self.process.communicate()}") from None
                time.sleep(0.2)

    def stop(self) -> tuple[int, str, str]:
        self.process.send_signal(signal.SIGINT)
        out, err = self.process.communicate(timeout=120)
        return self.process.returncode, out, err


def status(browser) -> str:
    """The progress line (read by script: an element found before a reload would be stale after it)."""
    return browser.execute_script("const s = document.getElementById('status'); return s ? s.textContent : ''")


def press(browser, key: str, expect: str) -> None:
    ActionChains(browser).send_keys(key).perform()
    WebDriverWait(browser, 10).until(lambda b: status(b).startswith(expect), f"status after {key!r}: {status(browser)!r}")


@pytest.fixture
def run(tiny_study, tmp_path):
    return shutil.copytree(tiny_study, tmp_path / "run")


def test_label_by_key_presses_reload_restart_and_see_them_in_the_report(browser, run):
    port = free_port()
    served = Served(run, port)
    try:
        browser.get(served.url)
        browser.find_element(By.ID, "name").send_keys("ana\n")
        WebDriverWait(browser, 10).until(lambda b: status(b).startswith("0 of "))
        total = int(status(browser).split()[2])
        first = browser.find_element(By.ID, "image").get_attribute("src")
        for done, key in enumerate("ctnu", start=1):
            press(browser, key, f"{done} of {total}")
        press(browser, "z", f"3 of {total}")  # undo the last: its image is shown again
        browser.refresh()  # the page remembers who labels, the server what was labelled
        WebDriverWait(browser, 10).until(lambda b: status(b).startswith(f"3 of {total}"))
        assert browser.find_element(By.ID, "image").get_attribute("src") != first
        assert browser.execute_script("return window.__errors") == []
    finally:
        code, out, err = served.stop()
    assert code == 0 and "report in" in out and "Traceback" not in err, (out, err)
    assert sorted(by["ana"] for by in LabelStore(run / "review" / "labels.sqlite").current().values()) == ["concept", "none", "trace"]

    served = Served(run, port)  # a restart resumes where the labeller stopped
    try:
        browser.get(served.url)
        WebDriverWait(browser, 10).until(lambda b: status(b).startswith(f"3 of {total}"))
    finally:
        served.stop()
    browser.get((run / "report.html").as_uri())
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "What people saw" in text and "Cohen's κ" in text and "over 3 images" in text
