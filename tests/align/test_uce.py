"""UCE, a closed-form method: its equation, what it edits, the pipeline left as it was, its LoRA form, the families it
refuses, and the same roads as a trained method (CLI, study step, dry-run cost)."""

import json

import numpy as np
import pytest
import torch

import relapse
from relapse.align.edit import low_rank_lora
from relapse.align.uce import UCE, UCEConfig, cross_attention_projections, last_tokens, solve
from relapse.errors import UserError
from relapse.models.families import family_of
from relapse.train.module import ALIGN_RECORD
from tests.families import build

CONCEPT = dict(concept=["checkered"], concept_prompts=None)


def test_solve_sends_each_concept_where_its_guide_goes_and_keeps_the_preserved():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, generator=gen)
    concepts, guides, kept = (torch.randn(n, 8, generator=gen, dtype=torch.float64) for n in (2, 2, 3))
    edited = solve(w, concepts, guides, kept, 1.0, 1.0, 1e-6).double()
    assert torch.allclose(edited @ concepts.T, w.double() @ guides.T, atol=1e-4)  # 5 constraints on 8 inputs: exact
    assert torch.allclose(edited @ kept.T, w.double() @ kept.T, atol=1e-4)
    strong = solve(w, concepts, guides, kept, 1.0, 1.0, 1e6)
    assert torch.allclose(strong, w, atol=1e-4)  # lambda large: the weights stay put


def test_the_paper_equation_read_literally():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 5, generator=gen)
    c, g, p = (torch.randn(1, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    wd = w.double()
    left = 0.5 * wd + 2.0 * (wd @ g.T) @ c + 3.0 * (wd @ p.T) @ p
    right = 0.5 * torch.eye(5, dtype=torch.float64) + 2.0 * c.T @ c + 3.0 * p.T @ p
    np.testing.assert_allclose(solve(w, c, g, p, 2.0, 3.0, 0.5).double(), left @ torch.linalg.inv(right), atol=1e-5)


def test_uce_edits_only_the_cross_attention_keys_and_values_and_leaves_the_pipeline(tiny_pipe):
    before = {n: p.clone() for n, p in tiny_pipe.unet.named_parameters()}
    module = relapse.erase(tiny_pipe, UCEConfig(concept=["a checkered red star"], preserve=["a red star"]))
    assert all(torch.equal(p, before[n]) for n, p in tiny_pipe.unet.named_parameters()), "the pipeline was left as it was"
    family = family_of(tiny_pipe)
    projections = {f"{name}.weight" for name, _ in cross_attention_projections(family)}
    assert module.kind == "full" and set(module.weights) == projections and projections
    assert all(".attn2." in n and n.rsplit(".", 2)[-2] in ("to_k", "to_v") for n in projections)
    concept, guide, kept = (last_tokens(tiny_pipe, family, [t]).float() for t in ("a checkered red star", "", "a red star"))
    for name in projections:
        w, edited = before[name].detach(), module.weights[name]
        assert (edited @ concept.T - w @ guide.T).norm() < 0.5 * (w @ concept.T - w @ guide.T).norm()
        assert (edited @ kept.T - w @ kept.T).norm() < 0.25 * (w @ kept.T).norm()
    assert module.record["method"] == "uce" and module.record["history"] == [] and module.record["anchors"] == [""]


def test_a_safety_lora_fused_first_is_taken_out_again(tiny_pipe):
    esd = relapse.erase(tiny_pipe, relapse.ESDConfig(concept=["checkered"], steps=1, batch_size=1, sample_steps=2, lr=1e-2))
    before = {n: p.clone() for n, p in tiny_pipe.unet.named_parameters()}
    alone, stacked = (relapse.erase(tiny_pipe, UCEConfig(**CONCEPT), safety=safety) for safety in ([], [esd]))
    assert all(torch.equal(p, before[n]) for n, p in tiny_pipe.unet.named_parameters())
    assert not torch.equal(alone.weights[next(iter(alone.weights))], stacked.weights[next(iter(stacked.weights))])
    assert stacked.record["composes_with"][0]["scale"] == 1.0


def test_the_lora_form_is_the_edit_truncated_and_loads_in_plain_diffusers(tiny_pipe, tmp_path):
    full = relapse.erase(tiny_pipe, UCEConfig(**CONCEPT))
    exact = relapse.erase(tiny_pipe, UCEConfig(**CONCEPT, rank=64, **{"as": "lora"}))  # rank above every layer's width
    assert exact.kind == "lora" and exact.lora_config["r"] == 64
    for name, edited in full.weights.items():
        module = name.removesuffix(".weight")
        delta = exact.weights[f"{module}.lora_B.weight"] @ exact.weights[f"{module}.lora_A.weight"]
        original = dict(tiny_pipe.unet.named_parameters())[name]
        assert torch.allclose(original + delta, edited, atol=1e-5)
    exact.save(tmp_path / "uce")
    tiny_pipe.load_lora_weights(tmp_path / "uce")  # what a user of plain diffusers does
    tiny_pipe.fuse_lora()
    tiny_pipe.unload_lora_weights()
    weights = dict(tiny_pipe.unet.named_parameters())
    assert all(torch.allclose(weights[n], full.weights[n], atol=1e-4) for n in full.weights)


def test_low_rank_factors_keep_the_leading_singular_directions():
    gen = torch.Generator().manual_seed(2)
    delta = torch.randn(6, 3, generator=gen) @ torch.randn(3, 5, generator=gen)  # rank 3
    weights, config = low_rank_lora({"layer.weight": delta}, rank=3)
    assert config["r"] == 3 and torch.allclose(weights["layer.lora_B.weight"] @ weights["layer.lora_A.weight"], delta, atol=1e-5)
    one, _ = low_rank_lora({"layer.weight": delta}, rank=1)
    best = torch.linalg.svd(delta).S[1:].square().sum().sqrt()  # Eckart-Young: the rank-1 error is the rest's energy
    assert torch.isclose((one["layer.lora_B.weight"] @ one["layer.lora_A.weight"] - delta).norm(), best, atol=1e-4)


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_uce_runs_where_text_enters_by_cross_attention_and_is_refused_elsewhere(name):
    pipe = build(name)
    if name == "sd3":
        with pytest.raises(UserError, match="joins text and image in one attention"):
            relapse.erase(pipe, UCEConfig(**CONCEPT))
        return
    module = relapse.erase(pipe, UCEConfig(**CONCEPT))
    widths = {w.shape[1] for w in module.weights.values()}
    assert module.kind == "full" and widths == {pipe.unet.config.cross_attention_dim}  # both encoders' states side by side


def test_uce_from_the_cli_writes_a_pipeline_and_its_record(run_cli, tiny_model_dir, tmp_path):
    code, out, err = run_cli("align", "uce", "--model", tiny_model_dir, "--concept", "checkered", "--preserve", "a red star",
                             "--lambda", "0.1", "--out", tmp_path / "uce")
    assert code == 0, err
    final = tmp_path / "uce" / "final"
    record = json.loads((final / ALIGN_RECORD).read_text())
    assert record["config"]["lambda"] == 0.1 and record["preserved"] == ["a red star"] and record["kind"] == "full"
    assert (final / "model_index.json").is_file()  # the whole edited pipeline, as diffusers saves one
    code, _, err = run_cli("align", "uce", "--model", tiny_model_dir, "--out", tmp_path / "none")
    assert code == 2 and "name the concept" in err and not (tmp_path / "none").exists()


def test_uce_costs_no_training_pass():
    assert UCE.passes(UCEConfig(**CONCEPT)) == 0.0
