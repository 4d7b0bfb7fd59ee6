"""Textual inversion as a fine-tuning method: one new word's embedding trains and nothing else, the pipeline is
left as it was, and the result is the file diffusers' load_textual_inversion reads, giving the same encodings."""

import json
import logging

import pytest
import torch

import relapse
from relapse.errors import UserError
from relapse.finetuning.base import FinetuneConfig
from relapse.models.components import ToyModelSize, build_pipeline
from relapse.models.pipeline_utils import encode_prompts

TI = dict(method="textual-inversion", token="<c>", replaces=["checkered"], steps=3, batch_size=2, lr=5e-2)


def state(pipe):
    return ({k: v.clone() for k, v in pipe.unet.state_dict().items()},
            pipe.text_encoder.get_input_embeddings().weight.detach().clone(), len(pipe.tokenizer))


def test_one_embedding_trains_and_the_pipeline_is_left_as_it_was(tmp_path, tiny_pipe):
    unet, embeddings, vocabulary = state(tiny_pipe)
    module = relapse.finetune(tiny_pipe, FinetuneConfig(**TI, cache_dir=tmp_path / "cache"), data="toy:harmful:8")
    assert module.kind == "embedding" and list(module.weights) == ["<c>"] and module.weights["<c>"].shape == embeddings[0].shape
    unet_after, embeddings_after, vocabulary_after = state(tiny_pipe)
    assert vocabulary_after == vocabulary and torch.equal(embeddings_after, embeddings)  # the token is gone again
    assert all(torch.equal(unet_after[k], v) for k, v in unet.items())
    assert not torch.allclose(module.weights["<c>"], embeddings[:vocabulary].mean(0))  # it learned, from the mean start
    assert [h["loss"] > 0 for h in module.record["history"]] == [True] * 3


def test_the_saved_embedding_loads_in_plain_diffusers_and_encodes_as_in_memory(tmp_path, tiny_pipe, capsys):
    module = relapse.finetune(tiny_pipe, FinetuneConfig(**TI, cache_dir=tmp_path / "cache"), data="toy:harmful:8")
    module.save(tmp_path / "ti")
    plain, ours = build_pipeline(ToyModelSize.tiny(), seed=0), build_pipeline(ToyModelSize.tiny(), seed=0)
    plain.load_textual_inversion(tmp_path / "ti")  # a user's own diffusers call
    logging.Logger.warning_once.cache_clear()  # transformers says it once per process: let it speak again
    relapse.TrainedModule.load(tmp_path / "ti").apply(ours)
    assert "multivariate normal" not in capsys.readouterr().err  # how diffusers fills the new row first says nothing to a user
    prompts = ["a <c> red star", "a red star"]
    torch.testing.assert_close(encode_prompts(plain, prompts), encode_prompts(ours, prompts))
    base = build_pipeline(ToyModelSize.tiny(), seed=0)
    torch.testing.assert_close(encode_prompts(ours, prompts[1:]), encode_prompts(base, prompts[1:]))  # other words unchanged


@pytest.mark.parametrize("change, message", [({"token": None}, "needs the new word"), ({"replaces": ["tartan"]}, "no caption"),
                                             ({"token": "checkered"}, "already a word"), ({"init_word": "tartan"}, "not a word")])
def test_bad_textual_inversion_settings_fail_in_one_line(tmp_path, tiny_pipe, change, message):
    with pytest.raises(UserError, match=message):
        relapse.finetune(tiny_pipe, FinetuneConfig(**TI | change, cache_dir=tmp_path / "cache"), data="toy:harmful:8")


def test_relapse_generate_asks_for_a_learned_word_and_refuses_what_is_not_one(tmp_path, tiny_pipe, tiny_model_dir, run_cli):
    relapse.finetune(tiny_pipe, FinetuneConfig(**TI, cache_dir=tmp_path / "cache"), data="toy:harmful:8").save(tmp_path / "ti")
    (tmp_path / "prompts.txt").write_text("a <c> red star\n")
    common = ("generate", "--model", tiny_model_dir, "--prompts", tmp_path / "prompts.txt", "--steps", "1", "--images-per-prompt", "1")
    code, out, err = run_cli(*common, "--embedding", tmp_path / "ti", "--out", tmp_path / "images")
    assert code == 0, err
    assert json.loads((tmp_path / "images" / "manifest.jsonl").read_text())["embeddings"] == ["<c>"]
    (tmp_path / "pickle.bin").write_bytes(b"\x80\x04")
    for bad, message in [(tmp_path / "missing", "holds no learned_embeds"), (tmp_path / "pickle.bin", "never unpickles")]:
        code, _, err = run_cli(*common, "--embedding", bad, "--out", tmp_path / "never")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "never").exists()
    code, _, err = run_cli(*common, "--embedding", tmp_path / "ti", "--embedding", tmp_path / "ti", "--out", tmp_path / "never")
    assert code == 2 and "does not fit this model" in err  # the same word twice
