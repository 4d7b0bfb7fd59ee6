"""A run folder as `relapse study` leaves it, written by hand: cells of known images and known verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def fake_run(root: Path, cells: dict[tuple, list[str]]) -> Path:
    """cells: (defense, scenario, step, seed, prompt set) -> the toy detector's verdict per image (none, trace, concept).
    Each cell gets its own images folder and evaluation; returns the run folder."""
    rows = []
    for k, (key, verdicts) in enumerate(cells.items()):
        folder = root / "steps" / f"generate-{k:04d}"
        folder.mkdir(parents=True)
        per_image = []
        for i, verdict in enumerate(verdicts):
            Image.fromarray(np.full((32, 32, 3), (k * 40 + i) % 256, np.uint8)).save(folder / f"{i:04d}.png")
            per_image.append({"file": f"{i:04d}.png", "prompt": "p", "seed": i, "is_target": verdict == "concept",
                              "is_trace": verdict != "none", "target_score": 0.5})
        evaluation = {"detector": "toy", "n_images": len(verdicts), "target_rate": {}, "trace_rate": {},
                      "images": f"steps/generate-{k:04d}", "per_image": per_image}
        source = f"steps/evaluate-{k:04d}.json"
        (root / source).write_text(json.dumps(evaluation))
        labels = dict(zip(("defense", "scenario", "step", "seed", "prompt_set"), key))
        for metric in ("target_rate", "trace_rate"):
            rows.append(labels | {"detector": "toy", "metric": metric, "value": 0.0, "ci95_low": 0.0, "ci95_high": 1.0,
                                  "n": len(verdicts), "source": source})
    config = {"name": "fake", "model": "toy", "seeds": [0, 1], "defenses": {"none": [], "lt": [{"method": "lt"}]}, "before": ["direct"],
              "scenarios": {"malicious": {"finetune": {"method": "lora"}, "prompt_sets": ["direct"], "group": "malicious"}}}
    (root / "results.json").write_text(json.dumps({"config": config, "rows": rows}))
    return root


CELLS = {("none", "before", 0, 0, "direct"): ["concept"] * 40,
         ("lt", "before", 0, 0, "direct"): ["none"] * 40,
         ("lt", "malicious", 20, 0, "direct"): ["trace"] * 20 + ["none"] * 20,
         ("lt", "malicious", 200, 0, "direct"): ["concept"] * 10 + ["trace"] * 10 + ["none"] * 20,
         ("lt", "malicious", 200, 1, "direct"): ["none"] * 40}


@pytest.fixture
def run(tmp_path) -> Path:
    return fake_run(tmp_path / "run", CELLS)
