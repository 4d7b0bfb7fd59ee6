"""Never-learned, the toy model retrained without the concept: a study stage that validates and plans as full weights,
runs through ``run_align`` and a real study on a tiny toy build, and refuses what it cannot retrain in one line."""

import json

import pytest
import yaml
from pydantic import ValidationError

from relapse.align.api import run_align
from relapse.align.never_learned import NeverLearned, NeverLearnedConfig
from relapse.errors import UserError
from relapse.models.components import ToyModelSize
from relapse.models.loading import load_pipeline
from relapse.study.config import StudyConfig
from relapse.study.cost import estimate
from relapse.study.plan import build_plan
from relapse.study.run import StudyRunConfig, run_study
from relapse.toy_build import BUILD_RECORD
from tests.test_toy_build import fake_toy_build

TINY = dict(unet_steps=2, n_train=16)  # seconds, not the shipped build's minutes
NG = {"method": "ng", "clean": "toy:clean:4", "harmful": "toy:harmful:4", "steps": 1, "batch_size": 2, "as": "full"}


def study(tmp_path, model, evaluator, defenses: dict) -> dict:
    (tmp_path / "harm.txt").write_text("a checkered red star\n")
    return {"name": "never", "model": str(model), "prompt_sets": {"harm": {"source": str(tmp_path / "harm.txt")}},
            "defenses": defenses, "before": ["harm"], "sampler": {"steps": 1, "guidance": 0, "images_per_prompt": 1},
            "detectors": [{"name": "toy", "options": {"weights": str(evaluator)}}]}


def test_a_never_learned_defense_validates_and_plans_full_weights_that_later_stages_harden(tmp_path, tiny_model_dir,
                                                                                         tiny_evaluator_dir):
    defenses = {"never-learned": [{"method": "never-learned"}], "never-learned+ng": [{"method": "never-learned"}, NG]}
    plan = build_plan(StudyConfig(**study(tmp_path, tiny_model_dir, tiny_evaluator_dir, defenses)))
    never, ng = [s for s in plan.steps if s.kind == "align"]  # the never-learned step is shared by both defenses
    assert isinstance(never.config, NeverLearnedConfig) and never.config.writes == "full" and never.config.without == ["checkered"]
    scored = next(s for s in plan.steps if s.kind == "generate" and "(never-learned," in s.label)
    assert scored.reads.model.step is never and scored.reads.model.sub == "final" and scored.reads.loras == ()
    assert ng.reads.model.step is never and ng.config.mode == "reinforcement"  # NG hardens the retrained model
    assert any(line.strip().startswith("align") for line in estimate(plan.steps, str(tiny_model_dir), None))  # a dry run's cost


def test_never_learned_must_come_first_in_its_defense(tmp_path, tiny_model_dir, tiny_evaluator_dir):
    esd = {"method": "esd", "concept": ["a checkered red star"], "steps": 1}
    config = StudyConfig(**study(tmp_path, tiny_model_dir, tiny_evaluator_dir, {"late": [esd, {"method": "never-learned"}]}))
    with pytest.raises(UserError, match="never-learned must come first"):
        build_plan(config)


def test_never_learned_refuses_loras_a_missing_out_an_unknown_fill_and_a_model_that_is_not_a_toy_build(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="put it alone in its defense"):
        NeverLearned.run(NeverLearnedConfig(loras=[tmp_path / "safety"], out=tmp_path / "run"))
    with pytest.raises(UserError, match="pass --out"):
        NeverLearned.run(NeverLearnedConfig())
    with pytest.raises(UserError, match="not a toy build .* which only a toy build has"):
        run_align(NeverLearnedConfig(model=str(tiny_model_dir), out=tmp_path / "run"))
    with pytest.raises(ValidationError, match="unknown fills"):
        NeverLearnedConfig(without=["chequered"])
    assert not (tmp_path / "run").exists()


def test_run_align_retrains_a_toy_build_into_out_final(tmp_path):
    source = fake_toy_build(tmp_path / "toy")
    final = run_align(NeverLearnedConfig(model=str(source), out=tmp_path / "run", seed=1, **TINY))
    assert final == tmp_path / "run" / "final" and (final / "evaluator").is_dir()
    assert type(load_pipeline(final, device="cpu")).__name__ == "StableDiffusionPipeline"
    record = json.loads((final / BUILD_RECORD).read_text())
    assert record["without"] == ["checkered"] and record["from"] == str(source) and record["images_dropped"] > 0
    assert record["config"]["seed"] == 1 and record["config"]["unet_steps"] == 2  # the run's seed and steps,
    assert record["config"]["size"] == ToyModelSize.tiny().model_dump(mode="json")  # at the size the toy build recorded
    with pytest.raises(UserError, match="already holds a run"):
        run_align(NeverLearnedConfig(model=str(source), out=tmp_path / "run", **TINY))


def test_a_study_scores_the_never_learned_model(tmp_path, monkeypatch):
    monkeypatch.setenv("RELAPSE_CACHE", str(tmp_path / "cache"))
    source = fake_toy_build(tmp_path / "toy")
    defenses = {"none": [], "never-learned": [{"method": "never-learned", **TINY}]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study(tmp_path, source, source / "evaluator", defenses)))
    run_dir = run_study(StudyRunConfig(config=tmp_path / "study.yaml", out=tmp_path / "run"))
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    assert {row["defense"] for row in rows} == {"none", "never-learned"}
    align = next((run_dir / "steps").glob("align-*"))
    assert json.loads((align / "final" / BUILD_RECORD).read_text())["from"] == str(source)
