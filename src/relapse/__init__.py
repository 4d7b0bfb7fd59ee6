"""relapse: keep the safety alignment of text-to-image diffusion models from relapsing under fine-tuning,
and measure whether it did.

The library works in memory on diffusers pipelines; the ``relapse`` CLI and studies are layers that read
and write disk around it::

    import relapse

    pipe = relapse.load("toy")  # the embedded toy model, a local diffusers folder or a hub id
    images = relapse.generate(pipe, relapse.SamplerConfig(images_per_prompt=2, steps=8), prompts="toy:target_direct")
    result = relapse.evaluate(images, relapse.EvaluateConfig(detector="toy"))
    result.target_rate.rate, result.target_rate.interval, result.target_rate.n

Names are imported on first use, so ``import relapse`` stays light (no torch until it is needed).
"""

from importlib import import_module

from relapse import notices

notices.install()

_EXPORTS = {
    "load": ("relapse.models.loading", "load_pipeline"),
    "generate": ("relapse.sampling", "generate"),
    "Generation": ("relapse.sampling", "Generation"),
    "SamplerConfig": ("relapse.sampling", "SamplerConfig"),
    "GenerateConfig": ("relapse.sampling", "GenerateConfig"),
    "EvaluateConfig": ("relapse.measure.evaluate", "EvaluateConfig"),
    "Evaluation": ("relapse.measure.evaluate", "Evaluation"),
    "Rate": ("relapse.measure.evaluate", "Rate"),
    "AuditResult": ("relapse.verdict.audit", "AuditResult"),
    "AuditConfig": ("relapse.verdict.audit", "AuditConfig"),
    "evaluate": ("relapse.measure.evaluate", "evaluate"),
    "erase": ("relapse.align.api", "erase"),
    "harden": ("relapse.align.api", "harden"),
    "finetune": ("relapse.finetuning.base", "finetune"),
    "audit": ("relapse.verdict.audit", "audit"),
    "attack_prompts": ("relapse.attack.prompts", "attack_prompts"),
    "PromptAttackConfig": ("relapse.attack.prompts", "PromptAttackConfig"),
    "TrainedModule": ("relapse.train.module", "TrainedModule"),
    "ESDConfig": ("relapse.align.esd", "ESDConfig"),
    "SDDConfig": ("relapse.align.sdd", "SDDConfig"),
    "LTConfig": ("relapse.align.lt", "LTConfig"),
    "NGConfig": ("relapse.align.ng", "NGConfig"),
    "ResistConfig": ("relapse.align.resist", "ResistConfig"),
    "NeverLearnedConfig": ("relapse.align.never_learned", "NeverLearnedConfig"),
    "UCEConfig": ("relapse.align.uce", "UCEConfig"),
    "CAConfig": ("relapse.align.ca", "CAConfig"),
    "FMNConfig": ("relapse.align.fmn", "FMNConfig"),
    "SalUnConfig": ("relapse.align.salun", "SalUnConfig"),
    "RECEConfig": ("relapse.align.rece", "RECEConfig"),
    "SLDConfig": ("relapse.align.sld", "SLDConfig"),
    "MACEConfig": ("relapse.align.mace", "MACEConfig"),
    "AdvUnlearnConfig": ("relapse.align.advunlearn", "AdvUnlearnConfig"),
    "FinetuneConfig": ("relapse.finetuning.base", "FinetuneConfig"),
    "Prompt": ("relapse.data.prompts", "Prompt"),
    "Study": ("relapse.study.run", "Study"),
    "StudyConfig": ("relapse.study.config", "StudyConfig"),
    "UserError": ("relapse.errors", "UserError"),
    "progress": ("relapse.progress", None),  # the switch for every progress bar: relapse.progress.set_enabled(False)
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'relapse' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = import_module(module) if attribute is None else getattr(import_module(module), attribute)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
