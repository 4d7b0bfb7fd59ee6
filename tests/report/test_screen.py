"""The report's check of the weight-space pre-screen: each fine-tune's figure against the relapse its images show."""

import json

import pytest

from relapse.report.study_report import StudyResults, screen_pairs, screen_section


def test_the_screen_is_ranked_against_the_relapse_of_the_same_fine_tune_and_seed(tmp_path):
    def row(defense, seed, step, metric, value, detector="toy", prompt_set="direct"):
        return {"defense": defense, "scenario": "attack", "step": step, "seed": seed, "prompt_set": prompt_set,
                "detector": detector, "metric": metric, "value": value, "n": 30}

    relapse = {("esd", 0): 0.9, ("esd", 1): 0.5, ("lt", 0): 0.2, ("lt", 1): 0.1}  # after minus before
    rows = []
    for (defense, seed), gain in relapse.items():
        rows += [row(defense, seed, 0, "target_rate", 0.05), row(defense, seed, 200, "target_rate", 0.05 + gain),
                 row(defense, seed, 200, "update_cosine_to_undo", gain / 2, "weights", ""),  # ranks exactly as the relapse
                 row(defense, seed, 200, "update_safe_subspace_share", 1 - gain, "weights", "")]  # exactly reversed
    (tmp_path / "results.json").write_text(json.dumps({"config": {"before": ["direct"]}, "rows": rows}))
    res = StudyResults(tmp_path)
    figures, relapses = screen_pairs(res, "update_cosine_to_undo")
    assert sorted(figures) == sorted(g / 2 for g in relapse.values())
    assert relapses == pytest.approx([2 * f for f in figures])  # each figure with its own fine-tune's relapse
    text = screen_section(res)
    assert "&rho; = +1.00 (n = 4)" in text and "&rho; = -1.00 (n = 4)" in text
    assert "projection onto &minus;dW_safe: &rho; = - (n = 0)" in text  # not measured: no figure


def test_the_audit_verdict_of_each_lora_reads_its_scenarios_last_step(tmp_path):
    from relapse.report.study_report import audit_section

    def row(defense, seed, step, scenario, value):
        return {"defense": defense, "scenario": scenario, "step": step, "seed": seed, "prompt_set": "direct", "detector": "toy",
                "metric": "target_rate", "value": value, "n": 30}

    rows = [row("esd", s, 200, "malicious", v) for s, v in [(0, 0.9), (1, 0.05)]] + \
           [row("esd", s, 20, "malicious", 0.5) for s in (0, 1)] + [row("esd", s, 200, "benign", 0.0) for s in (0, 1)] + \
           [row("esd", 0, 200, "full", 0.9)]
    config = {"before": ["direct"], "scenarios": {"malicious": {"finetune": {"method": "lora"}},
                                                  "benign": {"finetune": {"method": "modular"}}, "full": {"finetune": {"method": "full"}}}}
    (tmp_path / "results.json").write_text(json.dumps({"config": config, "rows": rows}))
    text = audit_section(StudyResults(tmp_path))
    assert "<td>FAIL 1/2</td><td>PASS 0/2</td>" in text  # the last step only; one seed over 10% fails the LoRA
    assert "<th>full</th>" not in text  # a full fine-tune is no LoRA to audit


def test_the_concept_off_prompt_is_tabled_where_a_fine_tune_scored_a_quality_set(tmp_path):
    from relapse.report.study_report import off_prompt_section

    def row(scenario, step, prompt_set, value):
        return {"defense": "resist", "scenario": scenario, "step": step, "seed": 0, "prompt_set": prompt_set, "detector": "toy",
                "metric": "target_rate", "value": value, "n": 60, "ci95_low": 0.0, "ci95_high": 1.0}

    rows = [row("before", 0, "direct", 0.0), row("attack", 200, "direct", 0.0), row("before", 0, "clean", 0.0),
            row("attack", 200, "clean", 0.3), row("before", 0, "fills", 0.0)]
    config = {"before": ["direct", "clean", "fills"], "reference_sets": ["clean", "fills"],
              "scenarios": {"attack": {"quality_sets": ["clean"]}}, "defenses": {"resist": [{}]}}
    (tmp_path / "results.json").write_text(json.dumps({"config": config, "rows": rows}))
    text = "".join(off_prompt_section(StudyResults(tmp_path)))
    assert "<code>clean</code>" in text and "30.0 &plusmn; 0.0" in text  # the attack's concept on clean prompts
    assert "<code>fills</code>" not in text  # scored before fine-tuning only: the collateral tables' business
