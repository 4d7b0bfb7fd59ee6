"""What SD 3.x and FLUX.1 share: a flow-matching transformer over image and text tokens, its LoRA targets, the text
stream's projections (what a UNet's cross-attention is to the text: ESD-x's and SDD's layers), and a schedule that
may shift with the image size."""

from __future__ import annotations

from relapse.models.families.base import Family, FlowMatching


class FlowTransformer(Family):
    """Base of transformer families; subclasses say how many latent pixels make a token's side (:meth:`token_side`)."""

    denoiser_name = "transformer"
    # diffusers' train_dreambooth_lora_sd3.py / _flux.py: both streams' attention projections
    lora_targets = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"]
    objective_class = FlowMatching
    cross_attention = (".add_q_proj", ".add_k_proj", ".add_v_proj", ".to_add_out")
    io_layers = ("pos_embed", "x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")

    def timestep_kwargs(self, resolution):
        """``mu`` for a scheduler that shifts its schedule by image size (FLUX.1-dev, SD 3.5), as the pipelines
        compute it from the number of image tokens."""
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return {}
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        side = (resolution or self.resolution()) // self.pipe.vae_scale_factor // self.token_side()
        return {"mu": calculate_shift(side * side, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                      config.get("base_shift", 0.5), config.get("max_shift", 1.15))}

    def token_side(self) -> int:
        """Latent pixels per token side."""
        raise NotImplementedError
