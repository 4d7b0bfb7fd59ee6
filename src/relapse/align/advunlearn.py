"""AdvUnlearn (Zhang et al., NeurIPS 2024, "Defensive Unlearning with Adversarial Training for Robust Concept Erasure
in Diffusion Models"): adversarial training of the text encoder. An inner attack searches prompt tokens that bring the
concept back on the model as it is now; the outer step trains the text encoder to erase the concept under those
tokens, while a retain set of benign prompts keeps its predictions.

With theta* the original model (its UNet, which never changes, and its text encoder E*), E_phi the text encoder being
trained, c a concept prompt, a its anchor (the empty prompt, or the prompt less its concept's words with ``--anchor
strip``), x_t sampled by the original model under c from noise down to a random step of a ``sample_steps`` DDIM
schedule at ``sample_guidance`` (ESD's x_t), and [delta; c] the prompt with k adversarial token embeddings delta put
right after the start token:

    inner (attack_steps Adam steps on delta, text encoder frozen, fresh x_t and t each step):
        delta* = argmin_delta || eps(x_t, t, E_phi([delta; c])) - eps(x_t, t, E*(c)) ||^2
    outer (one step on phi):
        L_unlearn = || eps(x_t, t, E_phi([delta*; c])) - (eps(x_t, t, E*(a)) - eta (eps(x_t, t, E*(c)) - eps(x_t, t, E*(a)))) ||^2
        L_retain  = || eps(y_t, t, E_phi(r)) - eps(y_t, t, E*(r)) ||^2     (r: retain prompts, y_t sampled under r)
        L = L_unlearn + retain_weight * L_retain

so the attack finds the words that make the current model predict the concept again, and the step sends exactly that
prediction to ESD's negatively guided target. Before ``warmup_steps`` the outer step trains on c itself (no attack).

As the authors' code reads it (OPTML-Group/AdvUnlearn: ``train-scripts/AdvUnlearn.py``, ``utils/attack_util.py``
``soft_prompt_attack``, ``utils/get_loss.py`` ``get_train_loss_retain``, ``utils/util.py`` ``param_choices``, and the
README's commands for nudity): the attack is in word-embedding space (``attack_embd_type word_embd``), one token
(``adv_prompt_num 1``) put in front of the prompt (``attack_type prefix_k``), 30 Adam steps at lr 1e-3
(``attack_method pgd``: plain Adam steps, no projection), initialised from a random vocabulary word each time
(``attack_init random``, the README's), a new attack every step (``adv_prompt_update_step 1``) after 200 warm-up steps;
1,000 outer steps of Adam at lr 1e-5, batch 1 concept prompt; eta 1 (``negative_guidance``), x_t from 50 DDIM steps at
guidance 3 (``start_guidance``); every weight of the text encoder's transformer layers and its final layer norm trains,
the token and position embeddings do not (``text_encoder_full``, ``component all``); the retain term is added to the
loss (``retain_train reg``) at weight 0.3 on 5 prompts a step from ``coco_object``, 243 prompts "a photo of <object>"
of COCO's objects; the unlearn and retain x_t share one step of the schedule. SD 1.4, one CLIP text encoder.

Where relapse departs, and why:

- What trains and what is written: a LoRA on the text encoder (rank ``rank``, lora_alpha = rank) on the attention and
  MLP projections of its layers (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``fc1``, ``fc2``; ``--params attn``
  or ``mlp`` for one kind, as the authors' ``component``; ``--layers N`` for the first N, as their
  ``text_encoder_layer0...``), not full weights, and the layer norms stay. relapse's outputs are diffusers LoRAs that
  ``pipe.load_lora_weights(folder)`` loads (here ``text_encoder.*`` keys alone), fused onto any copy of the base, and
  its engine writes full weights for the denoiser only. A LoRA needs a larger learning rate than the authors' 1e-5 on
  full weights: the configs use 1e-4 (SD 1.4) and 1e-3 (toy).
- The retain prompts: any list (``--retain``) or prompt file (``--retain-prompts``); by default one "a photo of <name>"
  per category of COCO's 80 object categories, not the authors' 243-prompt file (which is not shipped here). They are
  drawn with replacement from one random stream (theirs: without, until the set is spent).
- The attack's gradient is each step's own; the authors' attack never zeroes its optimiser's gradient, so each of its
  steps follows the sum of all earlier gradients. Their ``fast_at`` variant, ``attack_init latest`` (start from the
  last attack's tokens) and the iterative retain variant are not offered.
- The attack reuses relapse's prompt attack machinery (:mod:`relapse.attack.prompts`: the placeholder ids and the
  prefix embedding hook), in continuous embedding space as the authors' code trains; ``relapse attack prompts``'s
  search over real words (UnlearnDiffAtk's) is how relapse then measures the result.
- Between attacks (``attack_every`` > 1) the latest adversarial tokens are put in front of each step's prompts (the
  authors keep the prompt too, with a single concept prompt the same thing).
- Families: SD 1.x/2.x (one CLIP text encoder, as the authors). SDXL's two encoders and pooled embedding, SD 3's and
  FLUX.1's T5 are refused.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from relapse.align import METHODS
from relapse.align.erasure import ErasureConfig, ErasureMethod
from relapse.errors import UserError
from relapse.models.families.base import join, size, take

# COCO's 80 object categories (the detection set's class names); the authors' retain prompts are "a photo of <object>"
COCO_OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light", "fire hydrant",
    "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush")
TARGETS = {"attn": ("q_proj", "k_proj", "v_proj", "out_proj"), "mlp": ("fc1", "fc2")}


class AdvUnlearnConfig(ErasureConfig):
    method: Literal["advunlearn"] = "advunlearn"
    as_: Literal["lora"] = Field("lora", alias="as", description="a LoRA on the text encoder (the denoiser never changes)")
    params: Literal["all", "attn", "mlp"] = Field(
        "all", description="which projections of the text encoder's layers carry the LoRA: attention and MLP (the "
                           "authors' component all), attention alone or MLP alone")
    layers: int | None = Field(None, gt=0, description="only the first N transformer layers of the text encoder train "
                                                       "(the authors' text_encoder_layer0...); None: every layer")
    steps: int = Field(1000, gt=0, description="outer optimizer steps (the authors: 1,000)")
    lr: float = Field(1e-4, gt=0, description="learning rate of the text-encoder LoRA (the authors: 1e-5 on full weights)")
    batch_size: int = Field(1, gt=0, description="concept prompts per micro-step (the authors: 1)")
    eta: float = Field(1.0, description="ESD's negative-guidance strength of the unlearn target (the authors: 1)")
    warmup_steps: int = Field(200, ge=0, description="outer steps on the plain concept prompts before the first attack "
                                                     "(the authors: 200)")
    attack_every: int = Field(1, gt=0, description="outer steps between two attacks; in between the latest tokens are "
                                                   "reused (the authors: 1)")
    attack_steps: int = Field(30, gt=0, description="Adam steps of each inner attack, each on a fresh x_t (the authors: 30)")
    attack_tokens: int = Field(1, gt=0, description="adversarial token embeddings put in front of the prompt (the authors: 1)")
    attack_lr: float = Field(1e-3, gt=0, description="Adam's learning rate on the adversarial embeddings (the authors: 1e-3)")
    retain: list[str] = Field(default_factory=list, description="prompts whose predictions the text encoder keeps "
                                                                "(default, with no --retain-prompts: 'a photo of <object>' "
                                                                "for COCO's 80 object categories)")
    retain_prompts: str | None = Field(None, description="a prompt file (or toy:NAME) of more prompts to keep")
    retain_batch: int = Field(5, gt=0, description="retain prompts per micro-step (the authors: 5)")
    retain_weight: float = Field(0.3, ge=0, description="the weight of the retain term (the authors' README: 0.3); 0 drops it")


@METHODS.register("advunlearn")
class AdvUnlearn(ErasureMethod):
    config = AdvUnlearnConfig
    uses_frozen = False  # the UNet never trains, so it is its own frozen original; E* is the encodings made at setup
    keeps_text_encoder = True
    adapts_denoiser = False
    adapter_name = "advunlearn"

    def check(self) -> None:
        from relapse.data.prompts import read_prompts

        super().check()
        cfg = self.cfg
        given = cfg.retain + ([p.text for p in read_prompts(cfg.retain_prompts)] if cfg.retain_prompts else [])
        self.retained = given or [f"a photo of {name}" for name in COCO_OBJECTS]
        self.adversarial: torch.Tensor | None = None  # the latest attack's token embeddings (batch, k, width)

    def setup(self, pipe, process: int) -> None:
        """Refuse other families first; then E*'s encodings of the concept, anchor and retain prompts (before the LoRA)."""
        from relapse.attack.prompts import word_ids
        from relapse.models.families import family_of

        family = family_of(pipe)
        if not family.single_text_encoder:
            raise UserError(f"AdvUnlearn trains one CLIP text encoder against attacks on it (SD 1.x/2.x, as its authors); "
                            f"this {type(pipe).__name__} has {len(family.text_encoders())} text encoders: erase with esd instead")
        super().setup(pipe, process)
        self.retain = self.family.encode(self.retained)
        self.words = word_ids(pipe.tokenizer)  # the attack starts from a random one of these words

    def held_beside(self, weight_bytes: int) -> dict[str, int]:
        from relapse.train.memory import bytes_per, count

        encoder = self.pipe.text_encoder
        return {"text encoder": count(encoder) * bytes_per(encoder)}

    def targets(self, encoder) -> list[str]:
        """The names of the text-encoder projections the LoRA covers."""
        kinds = TARGETS[self.cfg.params] if self.cfg.params != "all" else (*TARGETS["attn"], *TARGETS["mlp"])
        layers = self.cfg.layers if self.cfg.layers is not None else encoder.config.num_hidden_layers
        return [name for name, _ in encoder.named_modules()
                if name.rsplit(".", 1)[-1] in kinds and any(f"encoder.layers.{i}." in name for i in range(layers))]

    def trainable(self, pipe) -> list[torch.nn.Parameter]:
        from relapse.finetuning.methods import add_text_encoder_lora

        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise UserError("AdvUnlearn trains the text encoder in one process (it is not data-parallel here); run it without torchrun")
        for component in self.family.frozen_parts():
            component.requires_grad_(False)
        return add_text_encoder_lora(pipe.text_encoder, self.cfg.rank, self.adapter_name, self.targets(pipe.text_encoder))

    def text_encoder_loras(self, pipe) -> dict[str, tuple[dict, dict]]:
        from relapse.models.lora import adapter_lora

        return {"text_encoder": adapter_lora(pipe.text_encoder, self.adapter_name)}

    def remove(self, pipe) -> None:
        from relapse.finetuning.methods import remove_text_encoder_lora

        remove_text_encoder_lora(pipe.text_encoder)

    # ------------------------------------------------------------------------------------------------ the two loops
    def prefixed(self, texts: list[str], rows: torch.Tensor | None) -> dict:
        """The prompts as the text encoder being trained reads them, with the adversarial embeddings ``rows`` in front
        (a gradient reaches the LoRA and ``rows``)."""
        from relapse.attack.prompts import encode_prefixed, prefixed_ids

        if rows is None:
            return self.family.encode(texts, grad=True)
        encoder = self.pipe.text_encoder
        ids = prefixed_ids(self.pipe.tokenizer, texts, rows.shape[1], int(self.words[0])).to(encoder.device)
        return {"prompt_embeds": encode_prefixed(encoder, ids, rows)}

    def attack(self, model, texts: list[str], cond: dict, uncond: dict) -> torch.Tensor:
        """The inner loop: token embeddings in front of ``texts`` that pull the current model's prediction to the
        original's prediction of the concept, each step on a fresh x_t."""
        cfg, table = self.cfg, self.pipe.text_encoder.get_input_embeddings().weight
        start = self.words[torch.randint(0, len(self.words), (len(texts), cfg.attack_tokens), generator=self.gen)]
        rows = table[start.to(table.device)].detach().float().requires_grad_(True)
        optimizer = torch.optim.Adam([rows], lr=cfg.attack_lr)
        for _ in range(cfg.attack_steps):
            x_t, t = self.sample_xt(cond, uncond)
            with torch.no_grad():
                wanted = self.predict(model, x_t, t, cond)
            with torch.enable_grad():
                loss = F.mse_loss(self.predict(model, x_t, t, self.prefixed(texts, rows)), wanted)
                rows.grad = torch.autograd.grad(loss, rows)[0]  # the rows alone: the LoRA's gradient stays the outer step's
            optimizer.step()
        return rows.detach()

    def attacks_at(self, step: int) -> bool:
        cfg = self.cfg
        return step >= cfg.warmup_steps and (step - cfg.warmup_steps) % cfg.attack_every == 0

    def loss(self, model, step: int, micro: int, process: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        pick = torch.randint(0, size(self.concept), (cfg.batch_size,), generator=self.gen)
        keeps = cfg.retain_weight > 0
        kept = torch.randint(0, size(self.retain), (cfg.retain_batch if keeps else 0,), generator=self.gen)
        cond, texts, retain_cond = take(self.concept, pick), [self.concepts[i] for i in pick.tolist()], take(self.retain, kept)
        both = join(cond, retain_cond)
        uncond = take(self.uncond, torch.zeros(size(both), dtype=torch.long))
        if self.attacks_at(step):
            self.adversarial = self.attack(model, texts, cond, take(self.uncond, torch.zeros(len(pick), dtype=torch.long)))
        rows = self.adversarial if step >= cfg.warmup_steps else None
        x_all, t_all = self.sample_xt(both, uncond)  # one step of the schedule for both, as the authors draw it
        x_t, t, y_t, s = x_all[: len(pick)], t_all[: len(pick)], x_all[len(pick):], t_all[len(pick):]
        with torch.no_grad():
            eps_u, eps_c = self.predict(model, x_t, t, take(self.anchor, pick), cond).chunk(2)
            target = eps_u - cfg.eta * (eps_c - eps_u)
        unlearn = F.mse_loss(self.predict(model, x_t, t, self.prefixed(texts, rows)), target)
        logged = {"unlearn": round(unlearn.item(), 6)}
        loss = unlearn
        if keeps:
            with torch.no_grad():
                kept_target = self.predict(model, y_t, s, retain_cond)
            retained = F.mse_loss(self.predict(model, y_t, s, self.family.encode([self.retained[i] for i in kept.tolist()],
                                                                                grad=True)), kept_target)
            loss = unlearn + cfg.retain_weight * retained
            logged["retain"] = round(retained.item(), 6)
        return loss, {"loss": round(loss.item(), 6), **logged}

    # --------------------------------------------------------------------------------------------- cost and state
    @classmethod
    def attacks(cls, cfg: AdvUnlearnConfig) -> int:
        """How many steps of the run attack first."""
        return max(0, math.ceil((cfg.steps - cfg.warmup_steps) / cfg.attack_every))

    @classmethod
    def passes_per_step(cls, cfg: AdvUnlearnConfig) -> float:
        """x_t sampled for the concept and retain prompts (down to S/2 on average, two passes a step); the anchor's and
        concept's frozen passes and the trained one; the retain prompts' frozen and trained passes."""
        retain = cfg.retain_batch if cfg.retain_weight > 0 else 0
        return ((cfg.sample_steps + 2 + 3) * cfg.batch_size + (cfg.sample_steps + 1 + 3) * retain) * cfg.grad_accum

    @classmethod
    def passes(cls, cfg: AdvUnlearnConfig) -> float:
        """The outer steps, plus each attack's steps: a fresh x_t, the original's prediction and the attacked one."""
        attack = cfg.attack_steps * (cfg.sample_steps + 1 + 3) * cfg.batch_size * cfg.grad_accum
        return cfg.steps * cls.passes_per_step(cfg) + cls.attacks(cfg) * attack

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        return state | ({"adversarial": self.adversarial.cpu()} if self.adversarial is not None else {})

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        if "adversarial" in state:
            self.adversarial = state["adversarial"].to(self.pipe.text_encoder.device)

    def facts(self) -> dict:
        return super().facts() | {"retained": self.retained}
