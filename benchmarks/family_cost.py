"""Parameter counts and denoiser FLOPs of the real model families, counted on the meta device (no weights, no
download): what the GPU-hour estimates in configs/*-nudity.yaml and the memory table in docs/models.md rest on.

    .venv/bin/python benchmarks/family_cost.py

Architectures are diffusers' / transformers' classes with the published checkpoints' configs (typed here, since the
hub is out of reach); FLOPs are torch's FlopCounterMode over one forward pass at batch 1 and the family's native
resolution (matrix multiplies and convolutions; a backward pass costs about twice a forward). The toy UNet is
counted the same way, as the peer that measured step times are scaled from.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from relapse.models.families.flux import Flux
from relapse.models.families.sd import StableDiffusion
from relapse.models.families.sd3 import StableDiffusion3
from relapse.models.families.sdxl import StableDiffusionXL


def clip_text(hidden, layers, heads, ff, projection=None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=77, projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_xxl():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu"))


def vae(latent_channels=4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2)


def unet(**config):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config)


# family, denoiser config (the published checkpoint's, typed here), resolution, text tokens, text encoders, VAE
def sd14():
    return StableDiffusion, unet(sample_size=64, cross_attention_dim=768), 512, 77, [clip_text(768, 12, 12, 3072)], vae()


def sd21():
    net = unet(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
    return StableDiffusion, net, 768, 77, [clip_text(1024, 23, 16, 4096)], vae()


def sdxl():
    net = unet(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
               cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
               projection_class_embeddings_input_dim=2816)
    return StableDiffusionXL, net, 1024, 77, [clip_text(768, 12, 12, 3072), clip_text(1280, 32, 20, 5120, projection=1280)], vae()


def sd35_large():
    from diffusers import SD3Transformer2DModel

    net = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                                num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
    text = [clip_text(768, 12, 12, 3072, projection=768), clip_text(1280, 32, 20, 5120, projection=1280), t5_xxl()]
    return StableDiffusion3, net, 1024, 77, text, vae(16)


def flux_dev():
    from diffusers import FluxTransformer2DModel

    net = FluxTransformer2DModel(guidance_embeds=True)  # diffusers' defaults are FLUX.1's dimensions
    return Flux, net, 1024, 512, [clip_text(768, 12, 12, 3072), t5_xxl()], vae(16)


def toy():
    from relapse.models.components import build_components

    parts = build_components()
    return StableDiffusion, parts["unet"], 32, 20, [parts["text_encoder"]], parts["vae"]


FAMILIES = {"toy (SD 1.x shape)": toy, "SD 1.4": sd14, "SD 2.1 (768, v)": sd21, "SDXL": sdxl, "SD 3.5 Large": sd35_large,
            "FLUX.1-dev": flux_dev}


def count(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e9


def main() -> None:
    print(f"{'family':<20} {'px':>5} {'denoiser B':>10} {'text enc. B':>11} {'VAE B':>6} {'fwd GFLOP':>10} {'x toy':>8}")
    toy_flops = None
    for name, build in FAMILIES.items():
        with torch.device("meta"):
            family, net, px, tokens, text, autoencoder = build()
            scale = 2 ** (len(autoencoder.config.block_out_channels) - 1)
            latent = (autoencoder.config.latent_channels, px // scale, px // scale)
            with FlopCounterMode(display=False) as counter:  # the inputs relapse's dry run counts with
                net(**family.counting_inputs(dict(net.config), latent, tokens))
        flops = counter.get_total_flops() / 1e9
        toy_flops = toy_flops or flops
        print(f"{name:<20} {px:>5} {count(net):>10.3f} {sum(count(t) for t in text):>11.3f} "
              f"{count(autoencoder):>6.3f} {flops:>10.1f} {flops / toy_flops:>8.0f}")


if __name__ == "__main__":
    main()
