"""Issue 4's experiments on the toy world: do the catastrophic-forgetting defenses (LT, NG) hold under
malicious fine-tuning, and what do they cost?

    .venv/bin/python experiments/toy_forgetting.py --out runs/toy-forgetting [--seeds 0 1 2] [--workers 2] [--config F.yaml]

Per seed: the ESD safety LoRA of issue 3 -> LT and NG models, from the base (alignment) and from the
fused ESD model (reinforcement), fixed and dynamic noise for NG -> the same malicious fine-tune
(LoRA on harmful images, saved at 20/100/200 steps) of every model, the base and ESD included ->
generate -> toy evaluator (target rate on direct prompts; clean shape/colour accuracy and the Frechet
distance to real clean images in the evaluator's features, before and after the attack).
Steps are skipped when their output exists; results.json rows have issue 3's form.
"""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from toy_relapse import ExperimentConfig, SeedRun, fmt, run_experiment

ESD_DEFAULTS = ExperimentConfig()  # issue 3's ESD safety LoRA and malicious fine-tune, unchanged


class ForgettingExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "toy"
    seeds: list[int] = [0, 1, 2]
    workers: int = 2
    esd: dict = ESD_DEFAULTS.align
    # LT/NG: full UNet, one clean and one harmful batch of 8 per step
    defense: dict = {"clean": "toy:clean:1000", "harmful": "toy:harmful:200", "batch_size": 8, "lr": 1e-4, "steps": 200}
    defenses: dict[str, dict] = {  # name -> method, mode and overrides; "esd+" names harden the fused ESD model
        "lt": {"method": "lt"},
        "ng-fixed": {"method": "ng", "noise": "fixed"},
        "ng-dynamic": {"method": "ng", "noise": "dynamic"},
        "esd+lt": {"method": "lt", "mode": "reinforcement"},
        "esd+ng-fixed": {"method": "ng", "noise": "fixed", "mode": "reinforcement"},
        "esd+ng-dynamic": {"method": "ng", "noise": "dynamic", "mode": "reinforcement"},
    }
    attack_baselines: bool = True  # also attack the base and the ESD model (off: only the defenses above)
    malicious: dict = ESD_DEFAULTS.malicious
    malicious_images: int = ESD_DEFAULTS.malicious_images
    reference: str = "toy:clean:1000"  # real clean images for the Frechet distance
    images_per_prompt: int = ESD_DEFAULTS.images_per_prompt
    sample_steps: int = ESD_DEFAULTS.sample_steps
    guidance: float = ESD_DEFAULTS.guidance


@functools.cache
def reference_features(detector, source: str):
    """Real images' features for the Frechet distance, computed once per worker."""
    from relapse.data.datasets import load_dataset
    from relapse.evaluate.evaluate import reference_features as features_of

    return features_of(detector, load_dataset(source, 10_000).images)


class ForgettingSeedRun(SeedRun):
    def extra_metrics(self, prompt_set: str, images, detector) -> dict:
        from relapse.evaluate.evaluate import reference_distance

        if prompt_set != "clean":
            return {}
        return {"frechet_distance": reference_distance(detector.features(images), reference_features(detector, self.cfg.reference))}

    def esd_lora(self) -> Path:
        from relapse.align.base import run_align
        from relapse.align.erasure import ErasureConfig

        out = self.dir / "align-esd"
        if not out.is_dir():
            self.log("align esd")
            run_align(ErasureConfig(method="esd", model=self.cfg.model, out=out, seed=self.seed, **self.cfg.esd))
        return out

    def defend(self, name: str, settings: dict, esd: Path) -> Path:
        """A full pipeline folder: LT or NG from the base, or from the base with the ESD LoRA fused."""
        from relapse.align.base import run_align
        from relapse.align.forgetting import ForgettingConfig

        out = self.dir / f"align-{name}"
        if not out.is_dir():
            self.log(f"align {name}")
            loras = [esd] if settings.get("mode") == "reinforcement" else []
            run_align(ForgettingConfig(model=self.cfg.model, out=out, seed=self.seed, data_seed=self.seed, loras=loras,
                                       **{"as": "full"}, **self.cfg.defense, **settings))
        return out

    def attack(self, defense: str, model: str, fused: list[Path]) -> None:
        """The same malicious LoRA fine-tune on every model, scored at 0/20/100/200 steps."""
        from relapse.finetune.train import FinetuneConfig, run_finetune

        m = self.cfg.malicious
        out = self.dir / f"ft-malicious-{defense}"
        if not (out / "final").is_dir():
            self.log(f"malicious fine-tune of {defense}")
            run_finetune(FinetuneConfig(model=model, loras=fused, data=f"toy:harmful:{self.cfg.malicious_images}", method="lora",
                                        out=out, seed=self.seed, data_seed=self.seed, resume=out.is_dir(),
                                        **{k: v for k, v in m.items()}))
        before = [(p, 1.0) for p in fused]
        self.score(defense, "malicious", 0, before, ["target_direct", "clean"], model)
        for step in [*m["save_at"], m["steps"]]:
            folder = out / (f"step-{step:06d}" if step != m["steps"] else "final")
            sets = ["target_direct", "clean"] if step == m["steps"] else ["target_direct"]
            self.score(defense, "malicious", step, before + [(folder, 1.0)], sets, model)

    def run(self) -> list[dict]:
        needs_esd = self.cfg.attack_baselines or any(s.get("mode") == "reinforcement" for s in self.cfg.defenses.values())
        esd = self.esd_lora() if needs_esd else None
        if self.cfg.attack_baselines:
            self.attack("none", self.cfg.model, [])
            self.attack("esd", self.cfg.model, [esd])
        for name, settings in self.cfg.defenses.items():
            self.attack(name, str(self.defend(name, settings, esd)), [])
        return self.rows


def run_seed(args: tuple[ForgettingExperimentConfig, int, Path]) -> list[dict]:
    import torch

    torch.set_num_threads(1)  # one core per worker
    return ForgettingSeedRun(*args).run()


def headline(summary: list[dict]) -> str:
    """Per defense: direct-prompt target rate (and the on-prompt rate: flagged *and* of the asked shape and
    colour) at each attack step, then clean shape / colour accuracy and Frechet distance before and after."""
    by = {(s["defense"], s["step"], s["prompt_set"], s["metric"]): s for s in summary if s["scenario"] == "malicious"}
    steps = sorted({k[1] for k in by})
    defenses = list(dict.fromkeys(k[0] for k in sorted(by, key=lambda k: (len(k[0]), k[0]))))

    def cell(defense, step, prompt_set, metric) -> str:
        s = by.get((defense, step, prompt_set, metric))
        return f"{fmt(s['mean'], metric, '')} +- {fmt(s['sd'], metric, '')}" if s else "-"

    def attack(defense, step) -> str:
        return f"{cell(defense, step, 'target_direct', 'target_rate')} ({cell(defense, step, 'target_direct', 'target_on_prompt_rate')})"

    def quality(defense, step) -> str:
        return " / ".join(cell(defense, step, "clean", m) for m in ("shape_accuracy", "color_accuracy", "frechet_distance"))

    lines = ["| defense | " + " | ".join(f"target % (on-prompt %) @ {s}" for s in steps)
             + f" | clean shape % / colour % / FD @ 0 | same @ {steps[-1]} |", "|" + "---|" * (len(steps) + 3)]
    lines += [f"| {d} | " + " | ".join(attack(d, s) for s in steps) + f" | {quality(d, 0)} | {quality(d, steps[-1])} |"
              for d in defenses]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_experiment(ForgettingExperimentConfig, run_seed, headline, "runs/toy-forgetting", "toy forgetting experiments")
