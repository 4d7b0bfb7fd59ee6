"""Stable Diffusion components at toy size: the same diffusers/transformers classes as SD 1.x.

One factory serves the shipped toy model (``ToyModelSize()``) and the unit-test fixtures
(``ToyModelSize.tiny()``), so tests exercise exactly the classes real checkpoints use.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from relapse.data.toy_world import IMAGE_SIZE, vocabulary

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<unk>"


class ToyModelSize(BaseModel):
    """Widths and depths of the toy components (the defaults are the shipped toy model)."""

    model_config = ConfigDict(extra="forbid")

    vae_channels: tuple[int, ...] = (32, 32, 64)  # three levels: 32x32 images -> 8x8 latents
    vae_groups: int = 8
    latent_channels: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 20  # the longest toy caption is 17 tokens with BOS and EOS
    unet_channels: tuple[int, ...] = (64, 128)
    unet_layers_per_block: int = 1
    unet_head_dim: int = 8
    unet_groups: int = 16
    unet_time_dim: int = 128  # SD uses 4x the first width; half of that keeps the shipped model under 20 MB

    @classmethod
    def tiny(cls) -> ToyModelSize:
        """Millisecond-scale random components for unit tests (diffusers' get_dummy_components)."""
        return cls(vae_channels=(8, 8, 8), vae_groups=4, text_width=16, text_layers=1, text_heads=2,
                   unet_channels=(8, 16), unet_head_dim=4, unet_groups=4, unet_time_dim=16)


def build_tokenizer(max_tokens: int):
    """A word-level CLIP-style tokenizer over the toy vocabulary, built offline with `tokenizers`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, UNK]  # ids 0, 1, 2; EOS id != 2 makes CLIP pool at the first EOS
    vocab = {tok: i for i, tok in enumerate(specials + vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
        model_max_length=max_tokens,
    )


def build_components(size: ToyModelSize | None = None, seed: int = 0) -> dict:
    """Randomly initialised components, keyed as ``StableDiffusionPipeline(**components)`` wants them."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    size = size or ToyModelSize()
    tokenizer = build_tokenizer(size.max_tokens)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=size.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * len(size.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(size.vae_channels),
        block_out_channels=size.vae_channels, layers_per_block=1, norm_num_groups=size.vae_groups,
        sample_size=IMAGE_SIZE, mid_block_add_attention=False,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=size.text_width, intermediate_size=2 * size.text_width,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
        max_position_embeddings=size.max_tokens, projection_dim=size.text_width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    torch.manual_seed(seed)
    levels = len(size.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2 ** (len(size.vae_channels) - 1),
        in_channels=size.latent_channels, out_channels=size.latent_channels,
        block_out_channels=size.unet_channels, layers_per_block=size.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * levels, up_block_types=("CrossAttnUpBlock2D",) * levels,
        cross_attention_dim=size.text_width, attention_head_dim=size.unet_head_dim, norm_num_groups=size.unet_groups,
        time_embedding_dim=size.unet_time_dim,
    )
    # SD 1.x's noise schedule; DDIM samples well in 20 steps.
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet,
            "scheduler": scheduler, "safety_checker": None, "feature_extractor": None,
            "image_encoder": None, "requires_safety_checker": False}


def build_pipeline(size: ToyModelSize | None = None, seed: int = 0):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**build_components(size, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe
