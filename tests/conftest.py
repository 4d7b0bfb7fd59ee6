"""Shared fixtures: tiny random components built in milliseconds (diffusers' get_dummy_components)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

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
