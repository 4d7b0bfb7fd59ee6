"""Resist: concept erasure trained against simulated fine-tuning, a first-order meta-learned defense in
the line of ResAlign (NeurIPS 2025) and Meta-Unlearning: later fine-tuning is part of the training problem.

Each outer step draws a simulated attacker and trains the weights theta so that the concept stays erased
both now and *after* the attack:

1. The attacker: a setting drawn from the config (a LoRA of rank ``attack_rank`` on the attention
   projections, or every UNet weight; a learning rate; K steps; harmful data, or with probability
   ``benign_share`` benign data). Starting from theta, K Adam steps on the denoising loss of its data give an
   update Delta (theta held fixed).
2. The outer loss, with theta* the frozen original and ``a`` a harmful caption with the concept words
   stripped (``anchor: strip``; the empty prompt with ``anchor: empty``)::

       L(theta) = L_erase(theta) + lambda_keep * L_keep(theta) + beta * L_erase(theta + sg(Delta))

   - ``L_erase``: on noised harmful latents x_t, eps_theta(x_t, c) is pulled to ESD's target
     eps*(x_t, a) - eta * (eps*(x_t, c) - eps*(x_t, a)) (the data's x_t, not ESD's sampled ones).
   - ``L_keep``: on noised clean latents, eps_theta matches eps* (distillation: clean generation kept).
   - The attacked term is **first order** (as first-order MAML): its gradient is taken at theta + Delta
     and applied to theta as if d(theta + Delta)/d(theta) = I; the dependence of Delta on theta through
     the K inner steps is cut. The exact meta-gradient backpropagates through K UNet training steps
     (K-fold activations and Hessian-vector products); ResAlign's implicit gradient approximates that
     Jacobian, at a cost of its own. First order keeps an outer step at about K + 4 UNet passes, and the
     tests check that the outer gradient is exactly the gradient at the attacked weights.

The attacked gradient is computed inside the step (the attacked weights are restored before the step's
own forward pass) and enters the engine's backward as sum(theta * sg(g)), whose gradient is g.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from relapse.align import METHODS
from relapse.align.erasure import ConceptConfig, ConceptMethod
from relapse.train.engine import batch_at, draw, draw_rows

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")  # what a LoRA fine-tune adapts (diffusers' recipe)


class ResistConfig(ConceptConfig):
    method: Literal["resist"] = "resist"
    harmful: str | None = Field(None, description="images of the concept (imagefolder or toy:DOMAIN[:N]; or given in memory)")
    clean: str | None = Field(None, description="clean data whose generation is kept (or given in memory)")
    benign: str | None = Field(None, description="data of the simulated benign fine-tunes (default: the clean data)")
    params: Literal["xattn", "noxattn", "all"] = Field("all", description="what the defense trains")
    anchor: Literal["empty", "strip"] = Field("strip", description="harmful captions are steered to the empty prompt or to themselves minus the concept")
    eta: float = Field(1.0, description="ESD negative-guidance strength")
    keep_weight: float = Field(1.0, ge=0, description="lambda_keep: weight of clean distillation")
    resist_weight: float = Field(1.0, ge=0, description="beta: weight of the erasure after the simulated attack")
    attack_methods: list[Literal["lora", "full"]] = Field(["lora", "full"], min_length=1)
    attack_lora_lrs: list[float] = Field([1e-3, 3e-3], min_length=1, description="learning rates of simulated LoRA attacks")
    attack_full_lrs: list[float] = Field([1e-4, 3e-4], min_length=1, description="learning rates of simulated full attacks")
    attack_steps: list[int] = Field([5], min_length=1, description="K: steps of a simulated attack (one is drawn per outer step)")
    attack_rank: int = Field(8, gt=0)
    attack_batch: int = Field(8, gt=0)
    benign_share: float = Field(0.25, ge=0, le=1, description="probability that a simulated attack trains on benign data")


@dataclass
class Attack:
    method: str
    lr: float
    steps: int
    data: str  # harmful | benign


@dataclass
class NoisyBatch:
    x_t: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    noise: torch.Tensor
    anchor: torch.Tensor | None = None


@METHODS.register("resist")
class Resist(ConceptMethod):
    config = ResistConfig
    fix_hint = "lower --lr or the attack learning rates"

    def __init__(self, cfg: ResistConfig, loras=None, harmful=None, clean=None, benign=None):
        super().__init__(cfg, loras)
        self.given_data = {"harmful": harmful, "clean": clean, "benign": benign}

    def check(self) -> None:
        from relapse.data.datasets import as_dataset
        from relapse.errors import UserError

        super().check()
        sources = {name: given if given is not None else getattr(self.cfg, name) for name, given in self.given_data.items()}
        sources["benign"] = sources["benign"] if sources["benign"] is not None else sources["clean"]
        if missing := [name for name in ("harmful", "clean") if sources[name] is None]:
            raise UserError(f"resist needs {' and '.join(missing)} data: pass --{' and --'.join(missing)} (imagefolder or toy:DOMAIN[:N])")
        self.data = {name: as_dataset(source, self.cfg.data_seed + i) for i, (name, source) in enumerate(sources.items())}

    def setup(self, pipe, process: int) -> None:
        from diffusers import DDPMScheduler

        from relapse.models.pipeline_utils import encode_prompts, require_epsilon_prediction
        from relapse.train.cache import cached_encodings

        require_epsilon_prediction(pipe)
        super().setup(pipe, process)
        self.encodings = {name: cached_encodings(data, pipe, self.cfg.cache_dir)[0] for name, data in self.data.items()}
        anchors = self.cfg.anchor_texts(self.data["harmful"].captions)
        self.anchors = torch.cat([encode_prompts(pipe, anchors[i : i + 256]) for i in range(0, len(anchors), 256)]).cpu()
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.scale = pipe.vae.config.scaling_factor

    def trainable(self, pipe) -> list[torch.nn.Parameter]:
        self.params = super().trainable(pipe)
        return self.params

    # -- the batches -------------------------------------------------------------------------------------------
    def noisy_batch(self, name: str, gen: torch.Generator, size: int) -> NoisyBatch:
        """Noised latents of a batch of ``name`` data, their captions' encodings (and anchors, for harmful data)."""
        encodings = self.encodings[name]
        rows = draw_rows(encodings, gen, size)
        z0, text = batch_at(encodings, rows, self.scale, gen)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (size,), generator=gen)
        device = self.pipe.device
        anchor = self.anchors[rows].to(device) if name == "harmful" else None
        return NoisyBatch(self.scheduler.add_noise(z0, noise, t).to(device), t.to(device), text.to(device), noise.to(device), anchor)

    @torch.no_grad()
    def erase_target(self, batch: NoisyBatch) -> torch.Tensor:
        """ESD's target from the frozen original: eps*(x_t, a) - eta * (eps*(x_t, c) - eps*(x_t, a))."""
        with self.frozen() as frozen:
            x, t = torch.cat([batch.x_t, batch.x_t]), torch.cat([batch.t, batch.t])
            eps_a, eps_c = frozen(x, t, torch.cat([batch.anchor, batch.cond])).sample.chunk(2)
        return eps_a - self.cfg.eta * (eps_c - eps_a)

    @torch.no_grad()
    def original_prediction(self, batch: NoisyBatch) -> torch.Tensor:
        with self.frozen() as frozen:
            return frozen(batch.x_t, batch.t, batch.cond).sample

    # -- the simulated attacker ---------------------------------------------------------------------------------
    def draw_attack(self, gen: torch.Generator) -> Attack:
        cfg = self.cfg

        def pick(options):
            return options[int(torch.randint(0, len(options), (1,), generator=gen))]

        method = pick(cfg.attack_methods)
        lr = pick(cfg.attack_lora_lrs if method == "lora" else cfg.attack_full_lrs)
        data = "benign" if float(torch.rand(1, generator=gen)) < cfg.benign_share else "harmful"
        return Attack(method, lr, pick(cfg.attack_steps), data)

    def attack_targets(self, method: str) -> dict[str, torch.nn.Parameter]:
        """The UNet weights an attacker changes: every weight (full), or the attention projections' (LoRA)."""
        weights = {n: p for n, p in self.pipe.unet.named_parameters() if "lora_" not in n}
        if method == "full":
            return weights
        stems = tuple(f".{proj}.weight" for proj in ATTENTION_PROJECTIONS) + tuple(f".{proj}.base_layer.weight" for proj in ATTENTION_PROJECTIONS)
        return {n: p for n, p in weights.items() if n.endswith(stems) and p.dim() == 2}

    def simulate(self, attack: Attack, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """K Adam steps of the attacker from the current weights (held fixed): its update Delta per weight."""
        from torch.func import functional_call

        targets = self.attack_targets(attack.method)
        rank = self.cfg.attack_rank
        if attack.method == "lora":  # peft's "gaussian" init: A ~ N(0, 1/r), B = 0, scale alpha / r = 1
            factors = {n: (torch.zeros(w.shape[0], rank, device=w.device, requires_grad=True),
                           (torch.randn(rank, w.shape[1], generator=gen) / rank).to(w.device).requires_grad_())
                       for n, w in targets.items()}
            leaves = [f for pair in factors.values() for f in pair]

            def delta() -> dict[str, torch.Tensor]:
                return {n: b @ a for n, (b, a) in factors.items()}
        else:
            leaves = [torch.zeros_like(w, requires_grad=True) for w in targets.values()]

            def delta() -> dict[str, torch.Tensor]:
                return dict(zip(targets, leaves))
        optimizer = torch.optim.Adam(leaves, lr=attack.lr)
        for _ in range(attack.steps):
            batch = self.noisy_batch(attack.data, gen, self.cfg.attack_batch)
            weights = {n: targets[n].detach() + d for n, d in delta().items()}
            pred = functional_call(self.pipe.unet, weights, (batch.x_t, batch.t), {"encoder_hidden_states": batch.cond}).sample
            # autograd.grad, not backward: the defended weights' .grad must not collect the attacker's gradients
            grads = torch.autograd.grad(F.mse_loss(pred, batch.noise), leaves)
            for leaf, grad in zip(leaves, grads):
                leaf.grad = grad
            optimizer.step()
        with torch.no_grad():
            return {n: d.detach() for n, d in delta().items()}

    # -- the outer step -----------------------------------------------------------------------------------------
    def attacked_gradient(self, delta: dict[str, torch.Tensor], batch: NoisyBatch, target: torch.Tensor):
        """L_erase at theta + Delta and its gradient for theta (first order: Delta held fixed). The attacked
        weights are put back exactly (copied, not subtracted) before anything else runs."""
        unet = dict(self.pipe.unet.named_parameters())
        saved = {n: unet[n].detach().clone() for n in delta}
        try:
            with torch.no_grad():
                for n, d in delta.items():
                    unet[n].add_(d)
            attacked = F.mse_loss(self.pipe.unet(batch.x_t, batch.t, batch.cond).sample, target)
            grads = torch.autograd.grad(attacked, self.params)
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    unet[n].copy_(w)
        return attacked.detach(), grads

    def loss(self, model, step: int, micro: int, process: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, gen = self.cfg, draw(self.cfg.seed, step, micro, process)
        harmful, clean = self.noisy_batch("harmful", gen, cfg.batch_size), self.noisy_batch("clean", gen, cfg.batch_size)
        erase_target, keep_target = self.erase_target(harmful), self.original_prediction(clean)
        attack = self.draw_attack(gen)
        attacked, grads = self.attacked_gradient(self.simulate(attack, gen), harmful, erase_target)
        erase = F.mse_loss(model(harmful.x_t, harmful.t, harmful.cond).sample, erase_target)
        keep = F.mse_loss(model(clean.x_t, clean.t, clean.cond).sample, keep_target)
        # sum(theta * sg(g)) has gradient g: the attacked term's first-order gradient joins the engine's backward.
        surrogate = sum((p * g.detach()).sum() for p, g in zip(self.params, grads))
        objective = erase + cfg.keep_weight * keep + cfg.resist_weight * attacked
        logged = {"erase": erase.item(), "keep": keep.item(), "attacked": attacked.item(), "total": objective.item()}
        return erase + cfg.keep_weight * keep + cfg.resist_weight * surrogate, {k: round(v, 6) for k, v in logged.items()}

    def facts(self) -> dict:
        return super().facts() | {f"{name}_data": {"source": data.source, "fingerprint": data.fingerprint, "n": len(data.captions)}
                                  for name, data in self.data.items()}
