"""Tiny random pipelines of every family relapse serves, built offline the way diffusers' pipeline tests build them
(``get_dummy_components`` of the SDXL, SD3 and FLUX tests), with word-level tokenizers over the toy vocabulary in
place of CLIP's and T5's. Images are 32 px, so the toy evaluator reads them."""

from __future__ import annotations

import os

import torch

from relapse.models.components import ToyModelSize, build_pipeline, build_tokenizer

TOKENS = 20


def _vae(latent_channels: int = 4, **factors):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)  # three levels: 32 px images -> 8x8 latents
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=4, sample_size=32, mid_block_add_attention=False, **factors)


def _clip(tokenizer, width: int = 32, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=TOKENS, projection_dim=width,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=1, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))


def sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = build_tokenizer(TOKENS)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
        norm_num_groups=4,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=_vae(), text_encoder=_clip(tokenizer), text_encoder_2=_clip(tokenizer, projection=True),
                                     tokenizer=tokenizer, tokenizer_2=build_tokenizer(TOKENS), unet=unet, scheduler=scheduler)


def sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = build_tokenizer(TOKENS)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                                        pooled_projection_dim=64, out_channels=4)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip(tokenizer, projection=True), tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer, projection=True), tokenizer_2=build_tokenizer(TOKENS),
        text_encoder_3=_t5(tokenizer, 64), tokenizer_3=build_tokenizer(TOKENS))


def flux(guidance_embeds: bool = True):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer = build_tokenizer(TOKENS)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                         guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8))
    return FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                        vae=_vae(shift_factor=0.1159, scaling_factor=0.3611), text_encoder=_clip(tokenizer),
                        tokenizer=tokenizer, text_encoder_2=_t5(tokenizer, 32), tokenizer_2=build_tokenizer(TOKENS))


def sd_v_prediction():
    from diffusers import DDIMScheduler

    pipe = build_pipeline(ToyModelSize.tiny(), seed=0)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    return pipe


BUILDERS = {"sd-v": sd_v_prediction, "sdxl": sdxl, "sd3": sd3, "flux": flux}
RESOLUTION = 32


def build(name: str):
    """The family's tiny pipeline, on ``RELAPSE_TEST_DEVICE`` where it is set (benchmarks/gpu_check.py: cuda)."""
    pipe = BUILDERS[name]()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(os.environ.get("RELAPSE_TEST_DEVICE", "cpu"))
