"""Shared fixtures: tiny random components built in milliseconds (diffusers' get_dummy_components)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from relapse.cli import main
from relapse.measure.toy_evaluator import ToyEvaluator
from relapse.models.components import ToyModelSize, build_pipeline


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


CLIP_DIM = 16  # the tiny CLIP's projection_dim


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from relapse.models.components import build_tokenizer

    tokenizer = build_tokenizer(16)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, projection_dim=CLIP_DIM, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, projection_dim=CLIP_DIM)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=CLIP_DIM)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture
def tiny_pipe():
    return build_pipeline(ToyModelSize.tiny(), seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "pipe"
    build_pipeline(ToyModelSize.tiny(), seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_evaluator_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("evaluator")
    ToyEvaluator(width=4).save(path)
    return path


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run the real entry point in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["relapse", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory, tiny_model_dir, tiny_evaluator_dir) -> Path:
    """The run folder of a real study, the smallest whose report draws every part: two defenses, a fine-tune with
    three scored steps (curves), a quality set (scatter) and images (grid); one sampling step, no guidance. Tests
    that write into a run folder copy it first."""
    from relapse.study.run import StudyRunConfig, run_study

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
        return run_study(StudyRunConfig(config=tmp / "study.yaml", out=tmp / "run"))


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# The network is closed on the test machines: Chromium must not try to reach Google's services.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,900"]
# Runs before any script of the page: uncaught errors and rejections land in window.__errors.
ERROR_HOOK = """window.__errors = [];
window.addEventListener('error', e => window.__errors.push('error: ' + (e.message || e)));
window.addEventListener('unhandledrejection', e => window.__errors.push('unhandled rejection: ' + e.reason));"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium (Debian's chromium and chromium-driver, which `make test` installs through `make browser`)."""
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
