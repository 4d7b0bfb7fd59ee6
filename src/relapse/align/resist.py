"""Resist: concept erasure trained against simulated fine-tuning, a first-order meta-learned defense in
the line of ResAlign (NeurIPS 2025) and Meta-Unlearning: later fine-tuning is part of the training problem.

Each outer step advances a simulated attacker and trains the weights theta so that the concept stays
erased both now and *after* the attack:

1. The attacker: a setting drawn from the config (a LoRA of rank ``attack_rank`` on the attention
   projections, or every UNet weight; a learning rate; a length of ``attack_steps``; harmful data, or with
   probability ``benign_share`` benign data). Its update Delta is trained by Adam on the denoising loss of
   its data at theta + Delta (theta held fixed). The attack is **persistent**: each outer step takes
   ``inner_steps`` (K) more of its steps, from where the last outer step left it, until it has taken its
   length; then a new one is drawn. So theta meets attacks as long as real ones (200 steps) while an outer
   step pays for K of them, and it meets them at every depth from 0 to their length.
2. The outer loss, with theta* the frozen original and ``a`` a harmful caption with the concept words
   stripped (``anchor: strip``; the empty prompt with ``anchor: empty``)::

       L(theta) = L_erase(theta) + lambda_keep * L_keep(theta) + beta * L_erase(theta + sg(Delta))

   - ``L_erase``: on noised harmful latents x_t, eps_theta(x_t, c) is pulled to ESD's target
     eps*(x_t, a) - eta * (eps*(x_t, c) - eps*(x_t, a)) (the data's x_t, not ESD's sampled ones).
   - ``L_keep``: on noised clean latents, eps_theta matches eps* (distillation: clean generation kept).
   - The attacked term is **first order** (as first-order MAML): its gradient is taken at theta + Delta
     and applied to theta as if d(theta + Delta)/d(theta) = I; the dependence of Delta on theta through
     the attack's steps is cut. The exact meta-gradient backpropagates through every attack step
     (200-fold activations and Hessian-vector products); ResAlign's implicit gradient approximates that
     Jacobian by (I + alpha H)^-1 at a cost of its own. First order keeps an outer step at about K + 4
     UNet passes, and the tests check that the outer gradient is exactly the gradient at the attacked weights.

Why persistent: with a fresh attacker of K = 5 to 20 steps per outer step (the first version), the
attacked weights stayed close to theta, the attacked term added little to plain erasure, and 200 real
malicious LoRA steps brought the concept back to 80% on-prompt on the toy model; carrying the attacker on
to 200 steps held it under 10% (docs/methods.md, "Resist"). It is adversarial training against a
fine-tuning budget: theta is pushed until the concept stays erased where such a budget can take it.

The attacked gradient is computed inside the step (the attacked weights are restored before the step's
own forward pass) and enters the engine's backward as sum(theta * sg(g)), whose gradient is g. The
attacker (its setting, tensors, Adam moments and depth) is method state: checkpoints keep it, so a resumed
run goes on with the attack in progress; under several processes each process has its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from relapse.align import METHODS
from relapse.align.erasure import ConceptConfig, ConceptMethod
from relapse.models.families.base import join, take
from relapse.train.engine import batch_at, draw, draw_rows


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
    attack_methods: list[Literal["lora", "full"]] = Field(["full"], min_length=1, description=
                                                          "what simulated attacks train (one drawn per attack): every "
                                                          "denoiser weight, or a LoRA; full alone held both kinds of real "
                                                          "attack on the toy model (docs/methods.md)")
    attack_lora_lrs: list[float] = Field([1e-3, 3e-3], min_length=1, description="learning rates of simulated LoRA attacks")
    attack_full_lrs: list[float] = Field([1e-4, 3e-4], min_length=1, description="learning rates of simulated full attacks")
    attack_steps: list[int] = Field([200], min_length=1, description="steps of one simulated fine-tune (one is drawn per attack)")
    inner_steps: int = Field(5, gt=0, description="K: attack steps per outer step; an attack carries on across outer steps "
                                                   "until it has taken its attack_steps")
    attack_rank: int = Field(8, gt=0, description="rank of the simulated LoRA attacks")
    attack_batch: int = Field(8, gt=0, description="images per step of a simulated attack")
    benign_share: float = Field(0.25, ge=0, le=1, description="probability that a simulated attack trains on benign data")


@dataclass
class Attack:
    method: str  # lora | full
    lr: float
    steps: int
    data: str  # harmful | benign


@dataclass
class NoisyBatch:
    x_t: torch.Tensor
    t: torch.Tensor
    cond: dict
    target: torch.Tensor  # the denoising target (the noise, v or the flow velocity, as the family's objective says)
    anchor: dict | None = None


class Attacker:
    """A simulated fine-tune in progress: its setting, its own tensors (LoRA factors, or one update per weight),
    its Adam state and the steps it has taken. It outlives the outer step, so the weights are trained against
    attacks as long as real ones while an outer step pays for ``inner_steps`` of it."""

    METHODS, DATA = ("lora", "full"), ("harmful", "benign")  # their codes in a checkpoint

    def __init__(self, attack: Attack, targets: dict[str, torch.Tensor], rank: int, gen: torch.Generator):
        self.attack, self.targets, self.taken = attack, targets, 0
        if attack.method == "lora":  # peft's "gaussian" init: A ~ N(0, 1/r), B = 0, scale alpha / r = 1
            self.leaves = [factor for w in targets.values()
                           for factor in (torch.zeros(w.shape[0], rank, device=w.device),
                                          (torch.randn(rank, w.shape[1], generator=gen) / rank).to(w.device))]
        else:
            self.leaves = [torch.zeros_like(w) for w in targets.values()]
        for leaf in self.leaves:
            leaf.requires_grad_()
        self.optimizer = torch.optim.Adam(self.leaves, lr=attack.lr)

    @property
    def done(self) -> bool:
        return self.taken >= self.attack.steps

    def delta(self) -> dict[str, torch.Tensor]:
        """The attack's update of each weight it targets (B A for a LoRA)."""
        if self.attack.method == "lora":
            return {n: b @ a for n, b, a in zip(self.targets, self.leaves[::2], self.leaves[1::2])}
        return dict(zip(self.targets, self.leaves))

    def step(self, family, batch: NoisyBatch) -> None:
        """One Adam step on the denoising loss at the current weights plus the update (the weights held fixed)."""
        from torch.func import functional_call

        weights = {n: self.targets[n].detach() + d for n, d in self.delta().items()}

        def attacked(*args, **kwargs):  # the denoiser at the attacked weights, called as the family calls it
            return functional_call(family.denoiser(), weights, args, kwargs)

        pred = family.predict(attacked, batch.x_t, batch.t, batch.cond)
        # autograd.grad, not backward: the defended weights' .grad must not collect the attacker's gradients
        grads = torch.autograd.grad(F.mse_loss(pred, batch.target), self.leaves)
        for leaf, grad in zip(self.leaves, grads):
            leaf.grad = grad
        self.optimizer.step()
        self.taken += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        a = self.attack
        setting = {"method": self.METHODS.index(a.method), "lr": a.lr, "steps": a.steps, "data": self.DATA.index(a.data), "taken": self.taken}
        state = {f"attacker.{k}": torch.tensor(v, dtype=torch.float64) for k, v in setting.items()}
        # copies: Adam updates its moments in place, and a state must not move with the attacker it was taken from
        state |= {f"attacker.leaf.{i}": leaf.detach().clone() for i, leaf in enumerate(self.leaves)}
        for i, moments in self.optimizer.state_dict()["state"].items():
            state |= {f"attacker.adam.{i}.{k}": v.clone() for k, v in moments.items()}
        return state

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], targets_for, rank: int) -> Attacker:
        """The attacker a checkpoint holds; ``targets_for(method)`` gives the weights a method attacks."""
        code = {k.removeprefix("attacker."): v.item() for k, v in state.items() if k.count(".") == 1}
        attack = Attack(cls.METHODS[int(code["method"])], code["lr"], int(code["steps"]), cls.DATA[int(code["data"])])
        attacker = cls(attack, targets_for(attack.method), rank, torch.Generator())
        with torch.no_grad():
            for i, leaf in enumerate(attacker.leaves):
                leaf.copy_(state[f"attacker.leaf.{i}"])
        saved = attacker.optimizer.state_dict()
        saved["state"] = {i: {k: state[f"attacker.adam.{i}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")}
                          for i in range(len(attacker.leaves)) if f"attacker.adam.{i}.step" in state}
        attacker.optimizer.load_state_dict(saved)
        attacker.taken = int(code["taken"])
        return attacker


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
        from relapse.models.families.base import to
        from relapse.train.cache import cached_encodings

        super().setup(pipe, process)
        self.attacker: Attacker | None = None
        self.encodings = {name: cached_encodings(data, pipe, self.cfg.cache_dir)[0] for name, data in self.data.items()}
        anchors = self.cfg.anchor_texts(self.data["harmful"].captions)
        self.anchors = to(join(*[self.family.encode(anchors[i : i + 256]) for i in range(0, len(anchors), 256)]), "cpu")

    def trainable(self, pipe) -> list[torch.nn.Parameter]:
        self.params = super().trainable(pipe)
        return self.params

    @classmethod
    def passes_per_step(cls, cfg) -> float:
        """Three frozen passes (erase and keep targets), the attacked, erase and keep terms (forward and backward each),
        and ``inner_steps`` of the attacker's fine-tune."""
        return (12.0 * cfg.batch_size + 3.0 * cfg.inner_steps * cfg.attack_batch) * cfg.grad_accum

    def held_beside(self, weight_bytes: int) -> dict[str, int]:
        """A full simulated attacker holds an update and Adam's two moments per weight, in the weights' dtype."""
        from relapse.train.memory import count

        attacker = {"simulated attacker": 3 * count(self.family.denoiser()) * weight_bytes} if "full" in self.cfg.attack_methods else {}
        return super().held_beside(weight_bytes) | attacker

    # -- the batches -------------------------------------------------------------------------------------------
    def noisy_batch(self, name: str, gen: torch.Generator, size: int) -> NoisyBatch:
        """Noised latents of a batch of ``name`` data, their captions' encodings (and anchors, for harmful data)."""
        from relapse.models.families.base import to

        encodings, objective = self.encodings[name], self.family.objective
        rows = draw_rows(encodings, gen, size)
        z0, text = batch_at(encodings, rows, self.family, gen)
        noise = torch.randn(z0.shape, generator=gen)
        t = objective.draw_t(size, gen)
        device = self.family.device
        anchor = to(take(self.anchors, rows), device) if name == "harmful" else None
        return NoisyBatch(objective.noisy(z0, noise, t).to(device), t.to(device), to(text, device),
                          objective.target(z0, noise, t).to(device), anchor)

    @torch.no_grad()
    def erase_target(self, batch: NoisyBatch) -> torch.Tensor:
        """ESD's target from the frozen original: eps*(x_t, a) - eta * (eps*(x_t, c) - eps*(x_t, a))."""
        with self.frozen() as frozen:
            eps_a, eps_c = self.predict(frozen, batch.x_t, batch.t, batch.anchor, batch.cond).chunk(2)
        return eps_a - self.cfg.eta * (eps_c - eps_a)

    @torch.no_grad()
    def original_prediction(self, batch: NoisyBatch) -> torch.Tensor:
        with self.frozen() as frozen:
            return self.predict(frozen, batch.x_t, batch.t, batch.cond)

    # -- the simulated attacker ---------------------------------------------------------------------------------
    def draw_attack(self, gen: torch.Generator) -> Attack:
        cfg = self.cfg

        def pick(options):
            return options[int(torch.randint(0, len(options), (1,), generator=gen))]

        method = pick(cfg.attack_methods)
        lr = pick(cfg.attack_lora_lrs if method == "lora" else cfg.attack_full_lrs)
        data = "benign" if float(torch.rand(1, generator=gen)) < cfg.benign_share else "harmful"
        return Attack(method, lr, pick(cfg.attack_steps), data)

    def advance_attack(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """``inner_steps`` more steps of the attack in progress (a new one, drawn, when the last has ended):
        its update Delta per weight."""
        cfg = self.cfg
        if self.attacker is None or self.attacker.done:
            attack = self.draw_attack(gen)
            self.attacker = Attacker(attack, self.attack_targets(attack.method), cfg.attack_rank, gen)
        for _ in range(min(cfg.inner_steps, self.attacker.attack.steps - self.attacker.taken)):
            self.attacker.step(self.family, self.noisy_batch(self.attacker.attack.data, gen, cfg.attack_batch))
        with torch.no_grad():
            return {n: d.detach() for n, d in self.attacker.delta().items()}

    def attack_targets(self, method: str) -> dict[str, torch.nn.Parameter]:
        """The denoiser weights an attacker changes: every weight (full), or the attention projections' (LoRA)."""
        weights = {n: p for n, p in self.family.denoiser().named_parameters() if "lora_" not in n}
        if method == "full":
            return weights
        stems = tuple(f".{proj}{suffix}" for proj in self.family.lora_targets for suffix in (".weight", ".base_layer.weight"))
        return {n: p for n, p in weights.items() if n.endswith(stems) and p.dim() == 2}

    # -- the outer step -----------------------------------------------------------------------------------------
    def attacked_gradient(self, delta: dict[str, torch.Tensor], batch: NoisyBatch, target: torch.Tensor):
        """L_erase at theta + Delta and its gradient for theta (first order: Delta held fixed). The attacked
        weights are put back exactly (copied, not subtracted) before anything else runs."""
        denoiser = self.family.denoiser()
        weights = dict(denoiser.named_parameters())
        saved = {n: weights[n].detach().clone() for n in delta}
        try:
            with torch.no_grad():
                for n, d in delta.items():
                    weights[n].add_(d)
            attacked = F.mse_loss(self.predict(denoiser, batch.x_t, batch.t, batch.cond), target)
            grads = torch.autograd.grad(attacked, self.params)
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    weights[n].copy_(w)
        return attacked.detach(), grads

    def loss(self, model, step: int, micro: int, process: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, gen = self.cfg, draw(self.cfg.seed, step, micro, process)
        harmful, clean = self.noisy_batch("harmful", gen, cfg.batch_size), self.noisy_batch("clean", gen, cfg.batch_size)
        erase_target, keep_target = self.erase_target(harmful), self.original_prediction(clean)
        attacked, grads = self.attacked_gradient(self.advance_attack(gen), harmful, erase_target)
        erase = F.mse_loss(self.predict(model, harmful.x_t, harmful.t, harmful.cond), erase_target)
        keep = F.mse_loss(self.predict(model, clean.x_t, clean.t, clean.cond), keep_target)
        # sum(theta * sg(g)) has gradient g: the attacked term's first-order gradient joins the engine's backward.
        surrogate = sum((p * g.detach()).sum() for p, g in zip(self.params, grads))
        objective = erase + cfg.keep_weight * keep + cfg.resist_weight * attacked
        logged = {"erase": erase.item(), "keep": keep.item(), "attacked": attacked.item(), "total": objective.item()}
        logged = {k: round(v, 6) for k, v in logged.items()} | {"attack_depth": self.attacker.taken}
        return erase + cfg.keep_weight * keep + cfg.resist_weight * surrogate, logged

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.attacker.state_dict() if self.attacker is not None else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.attacker = Attacker.from_state(state, self.attack_targets, self.cfg.attack_rank)

    def facts(self) -> dict:
        return super().facts() | {f"{name}_data": {"source": data.source, "fingerprint": data.fingerprint, "n": len(data.captions)}
                                  for name, data in self.data.items()}
