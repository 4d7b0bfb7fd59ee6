import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from relapse.models.components import build_tokenizer


def test_tokenizer_is_word_level_with_clip_special_tokens():
    tok = build_tokenizer(20)
    ids = tok("A Chessboard-patterned red disc").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[1:-1]) == "a chessboard - patterned red disc"
    assert tok("zebra").input_ids[1] == tok.unk_token_id
    padded = tok("a red star", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 20 and padded[-1] == tok.pad_token_id == tok.eos_token_id


def test_text_encoder_pools_at_the_first_eos(tiny_pipe):
    tok, enc = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    ids = tok(["a red star"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    out = enc(ids)
    first_eos = int((ids[0] == tok.eos_token_id).nonzero()[0])
    torch.testing.assert_close(out.pooler_output[0], out.last_hidden_state[0, first_eos])


def test_pipeline_round_trips_through_plain_diffusers(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    kwargs = dict(prompt=["a red star on a black background"], num_inference_steps=2, output_type="np")
    a = tiny_pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    b = loaded(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert a.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(a, b, atol=1e-6)
