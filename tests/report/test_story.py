"""The story table: a row per defense, its columns from the config, the mean over seeds by the first detector."""

import pytest
from pydantic import ValidationError

from relapse.report.story import story_table
from relapse.study.config import StudyConfig

CONFIG = {"name": "s", "model": "toy", "seeds": [0, 1],
          "prompt_sets": {"harm": {"source": "toy:target_direct"}, "clean": {"source": "toy:clean"}},
          "defenses": {"none": [], "esd": [{"method": "esd", "concept": ["checkered"]}]}, "before": ["harm", "clean"],
          "scenarios": {"malicious": {"finetune": {"data": "toy:harmful:8", "steps": 200, "save_at": [20]}, "prompt_sets": ["harm"]}},
          "detectors": [{"name": "toy"}, {"name": "nudenet"}],
          "story": [{"title": "before", "prompt_set": "harm"}, {"title": "malicious 200", "scenario": "malicious", "prompt_set": "harm"},
                    {"title": "malicious 20", "scenario": "malicious", "step": 20, "prompt_set": "harm"},
                    {"title": "FD", "prompt_set": "clean", "metric": "frechet_distance"}]}


def row(defense, scenario, step, seed, value, metric="target_rate", prompt_set="harm", detector="toy"):
    return {"defense": defense, "scenario": scenario, "step": step, "seed": seed, "prompt_set": prompt_set,
            "detector": detector, "metric": metric, "value": value}


def test_each_cell_is_the_mean_over_seeds_at_its_step_by_the_first_detector():
    config = StudyConfig(**CONFIG).model_dump(mode="json")
    rows = [row("esd", "before", 0, 0, 0.0), row("esd", "before", 0, 1, 0.1),
            row("esd", "malicious", 20, 0, 0.3), row("esd", "malicious", 200, 0, 0.9), row("esd", "malicious", 200, 1, 0.8),
            row("esd", "malicious", 200, 0, 0.0, detector="nudenet"),
            row("esd", "before", 0, 0, 101.4, "frechet_distance", "clean"), row("none", "before", 0, 0, 0.97)]
    headings, cells = story_table(config, rows)
    assert headings == ["defense", "before", "malicious 200", "malicious 20", "FD"]
    assert cells == [["none", "97", "", "", ""], ["esd", "5", "85", "30", "101"]]


def test_a_story_column_must_name_what_the_study_defines():
    with pytest.raises(ValidationError, match="story column 'x'"):
        StudyConfig(**CONFIG | {"story": [{"title": "x", "scenario": "benign", "prompt_set": "harm"}]})
    with pytest.raises(ValidationError, match="at most 7"):
        StudyConfig(**CONFIG | {"story": [{"title": str(i), "prompt_set": "harm"} for i in range(8)]})
