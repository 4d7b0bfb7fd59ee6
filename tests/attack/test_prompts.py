"""Adversarial prompts (UnlearnDiffAtk): the search descends the erased model's denoising loss with real words in
front of each prompt, reports the loss those words really have, leaves the model as it was, and writes a prompt file
the other commands read."""

import json

import numpy as np
import pytest
import torch

from relapse.attack.prompts import (
    AttackPromptsConfig,
    PromptAttackConfig,
    attack_prompts,
    denoising_losses,
    draw,
    noise_scheduler,
    project_to_simplex,
    run_attack_prompts,
    target_latents,
)
from relapse.data.prompts import Prompt, read_prompts
from relapse.errors import UserError
from relapse.models.components import ToyModelSize, build_pipeline
from relapse.models.pipeline_utils import encode_prompts, weights_fingerprint
from relapse.sampling import SamplerConfig, generate
from tests.conftest import random_images
from tests.models.test_lora import make_lora
from tests.test_cli import assert_user_error

PROMPTS = [Prompt("a red star on a black background", seed=7, meta={"set": "x"}), Prompt("a blue circle", guidance=3.0),
           Prompt("a checkered green square"), Prompt("a plain yellow heart")]
SEARCH = PromptAttackConfig(tokens=3, iterations=8, check_every=4, lr=0.05, eval_draws=4)


def frozen_state(pipe) -> dict:
    return {name: (weights_fingerprint(module), any(p.requires_grad for p in module.parameters()))
            for name, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder), ("vae", pipe.vae))}


@pytest.fixture(scope="module")
def attacked():
    """One search on a tiny model, and the model's weights before it."""
    pipe = build_pipeline(ToyModelSize.tiny(), seed=0)
    before = frozen_state(pipe)
    targets = random_images(len(PROMPTS))
    return pipe, targets, before, attack_prompts(pipe, SEARCH, prompts=PROMPTS, targets=targets)


def test_the_adversarial_words_are_plain_vocabulary_words_in_front_of_the_prompt(attacked):
    pipe, _, _, adversarial = attacked
    vocabulary, special = pipe.tokenizer.get_vocab(), set(pipe.tokenizer.all_special_tokens)
    for prompt, asked in zip(adversarial, PROMPTS):
        words = prompt.meta["adversarial_tokens"]
        assert len(words) == SEARCH.tokens and all(w in vocabulary and w not in special and w.isalpha() for w in words)
        assert prompt.text == " ".join(words) + " " + asked.text
        assert (prompt.meta["asks"], prompt.seed, prompt.guidance) == (asked.text, asked.seed, asked.guidance)
        assert asked.meta.items() <= prompt.meta.items()


def test_the_reported_losses_are_those_of_the_written_prompts_on_the_same_draws(attacked):
    """The forward pass saw the projected words: the returned text, tokenized and encoded as the pipeline does it,
    has exactly the reported loss; the unmodified prompt has the reported start."""
    pipe, targets, _, adversarial = attacked
    latents = target_latents(pipe, targets)
    held = draw(torch.Generator().manual_seed(SEARCH.seed), latents, SEARCH.eval_draws, 1000)  # the generator's first draws
    with torch.no_grad():
        for key, texts in (("attack_loss", [p.text for p in adversarial]), ("attack_loss_start", [p.text for p in PROMPTS])):
            replayed = denoising_losses(pipe, noise_scheduler(pipe), latents, encode_prompts(pipe, texts), held)
            assert replayed.tolist() == pytest.approx([p.meta[key] for p in adversarial], abs=2e-6)


def test_the_model_is_left_as_it_was_and_frozen(attacked):
    pipe, _, before, _ = attacked
    assert {name: fingerprint for name, (fingerprint, _) in frozen_state(pipe).items()} == \
        {name: fingerprint for name, (fingerprint, _) in before.items()}
    assert not any(grad for _, grad in frozen_state(pipe).values())
    assert not pipe.text_encoder.get_input_embeddings()._forward_hooks  # the embedding swap is gone


def test_descent_lowers_the_denoising_loss_below_the_unmodified_prompt(tiny_pipe):
    """One scoring at the end, so no selection helps: the words come from the gradient alone (ascent raises it)."""
    config = PromptAttackConfig(iterations=10, check_every=10, lr=0.1, eval_draws=4)
    adversarial = attack_prompts(tiny_pipe, config, prompts=PROMPTS, targets=random_images(len(PROMPTS)))
    assert np.mean([p.meta["attack_loss"] for p in adversarial]) < np.mean([p.meta["attack_loss_start"] for p in adversarial])


def test_the_seed_decides_the_prompts_and_the_batch_size_does_not(tiny_pipe):
    config, targets = PromptAttackConfig(iterations=2, check_every=2, eval_draws=2), random_images(2)
    changes = ({"seed": 0}, {"seed": 0, "batch_size": 1}, {"seed": 1})
    runs = [attack_prompts(tiny_pipe, config.model_copy(update=change), prompts=PROMPTS[:2], targets=targets) for change in changes]
    texts = [[p.text for p in run] for run in runs]
    assert texts[0] == texts[1] and texts[0] != texts[2]
    assert [p.meta["attack_loss"] for p in runs[0]] == pytest.approx([p.meta["attack_loss"] for p in runs[1]], abs=2e-6)


def test_targets_of_the_wrong_size_are_refused(tiny_pipe):
    with pytest.raises(UserError, match="32x32"):
        attack_prompts(tiny_pipe, SEARCH, prompts=PROMPTS, targets=random_images(len(PROMPTS) - 1))


def test_the_simplex_projection_is_the_nearest_probability_vector():
    vectors = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    projected = project_to_simplex(vectors)
    assert torch.allclose(projected.sum(-1), torch.ones(3, 5, dtype=torch.float64)) and bool((projected >= 0).all())
    assert torch.allclose(project_to_simplex(projected), projected)
    others = torch.distributions.Dirichlet(torch.ones(7, dtype=torch.float64)).sample((1000,))
    nearest = (vectors[0, 0] - projected[0, 0]).norm()
    assert bool(((others - vectors[0, 0]).norm(dim=-1) >= nearest).all())


def write_prompt_file(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p.text, **p.meta}) + "\n" for p in prompts))
    return path


def test_the_prompt_file_reads_back_whole_with_targets_from_a_generate_folder(tmp_path, tiny_model_dir):
    source = write_prompt_file(tmp_path / "p.jsonl", PROMPTS[2:])
    generate(build_pipeline(ToyModelSize.tiny(), seed=0), SamplerConfig(images_per_prompt=2, steps=2), prompts=str(source)).save(tmp_path / "g")
    config = AttackPromptsConfig(model=str(tiny_model_dir), prompts=str(source), targets=tmp_path / "g", out=tmp_path / "adv",
                                 iterations=2, check_every=1, eval_draws=2, device="cpu")
    folder = run_attack_prompts(config)
    written = read_prompts(folder / "prompts.jsonl")
    assert [p.meta["asks"] for p in written] == [p.text for p in PROMPTS[2:]]
    assert all(p.text.endswith(p.meta["asks"]) and len(p.meta["adversarial_tokens"]) == 5 for p in written)
    assert sorted(f.name for f in (folder / "targets").iterdir()) == ["0000.png", "0001.png"]
    assert json.loads((folder / "run.json").read_text())["n_prompts"] == 2


def test_targets_drawn_for_other_prompts_are_refused_and_nothing_is_written(tmp_path, tiny_model_dir):
    generate(build_pipeline(ToyModelSize.tiny(), seed=0), SamplerConfig(steps=1), prompts=["a red star", "a blue moon"]).save(tmp_path / "g")
    for prompts in (PROMPTS[:2], PROMPTS[:3]):
        config = AttackPromptsConfig(model=str(tiny_model_dir), prompts=str(write_prompt_file(tmp_path / "p.jsonl", prompts)),
                                     targets=tmp_path / "g", out=tmp_path / "adv", iterations=1)
        with pytest.raises(UserError, match="same --prompts"):
            run_attack_prompts(config)
        assert not (tmp_path / "adv").exists()


def test_the_cli_attacks_a_safety_lora_toward_the_model_without_it(run_cli, tmp_path, tiny_model_dir):
    lora = make_lora(tmp_path / "safety")
    (tmp_path / "p.txt").write_text("a checkered red star\n")
    (tmp_path / "attack.yaml").write_text("iterations: 2\ncheck_every: 1\neval_draws: 2\n")
    code, out, err = run_cli("attack", "prompts", "--model", tiny_model_dir, "--lora", lora, "--prompts", tmp_path / "p.txt",
                             "--out", tmp_path / "adv", "--tokens", 2, "--target-steps", 1, "--device", "cpu",
                             "--config", tmp_path / "attack.yaml")
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith(f"1 adversarial prompts in {tmp_path / 'adv' / 'prompts.jsonl'}")
    record = json.loads((tmp_path / "adv" / "run.json").read_text())
    assert (record["config"]["iterations"], record["config"]["tokens"], len(record["loras"])) == (2, 2, 1)
    assert len(read_prompts(tmp_path / "adv" / "prompts.jsonl")[0].meta["adversarial_tokens"]) == 2


def test_the_cli_wants_targets_when_the_model_has_no_lora_to_drop(run_cli, tmp_path, tiny_model_dir):
    (tmp_path / "p.txt").write_text("a checkered red star\n")
    assert_user_error(run_cli("attack", "prompts", "--model", tiny_model_dir, "--prompts", tmp_path / "p.txt",
                              "--out", tmp_path / "adv"), "--targets")
    assert not (tmp_path / "adv").exists()
