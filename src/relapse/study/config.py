"""The study config: a base model, prompt sets, defenses, fine-tuning scenarios, seeds and the
evaluation, in one typed YAML file.

A *defense* is a list of alignment stages applied in order, each the config of its method (``method``
picks ESDConfig, SDDConfig, LTConfig, NGConfig, ...; ``model``, ``out`` and ``seed`` are the study's),
validated once when the study loads. An erasure
stage (ESD, SDD) runs on the base. A stage that writes a LoRA adds it to the model; a forgetting
stage (LT, NG) after LoRA stages hardens the model with them fused (reinforcement), and a stage that
writes full weights becomes the new model. ``none: []`` is the unaligned base.

A *scenario* is a ``relapse finetune`` of every defended model (or those it names), scored at each
step of its sweep on its ``prompt_sets`` and, before and after, on its ``quality_sets``. Its data is a
dataset (``finetune.data``) or the unaligned base model's own generations on one of the study's
prompt sets (``generated_data``), the relearning data IMMA and Meta-Unlearning use. Its ``group``
(benign, malicious, ...) decides which table of the report it joins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, model_validator

from relapse.align import METHODS as ALIGN_METHODS
from relapse.attack.prompts import PromptAttackConfig
from relapse.config import SourceLines
from relapse.errors import UserError
from relapse.finetuning.base import FinetuneConfig
from relapse.sampling import SamplerConfig
from relapse.tracking import Tracker

STUDY_OWNED = ("model", "out", "seed", "resume")  # fields the study sets on every stage and fine-tune
FINETUNE_STUDY_OWNED = (*STUDY_OWNED, "loras", "lora_scales", "data_seed")
# A stage is the config of its method, picked by its `method` (a union over the registered methods).
AlignStage = Annotated[
    Union[tuple(Annotated[ALIGN_METHODS.get(name).config, Tag(name)] for name in ALIGN_METHODS.names())],  # noqa: UP007
    Discriminator(lambda stage: stage.get("method") if isinstance(stage, dict) else getattr(stage, "method", None),
                  custom_error_type="stage_method",
                  custom_error_message=f"every stage needs a method, one of: {', '.join(ALIGN_METHODS.names())}")]


class DefenseSpec(BaseModel):
    """A defense whose alignments differ from the study's: its stages and its own alignment seeds."""

    model_config = ConfigDict(extra="forbid")

    stages: list[AlignStage] = Field(description="the alignment stages, in order")
    align_seeds: list[int] = Field(min_length=1, description="its alignments (e.g. [0]: one model, where the study aligns "
                                                             "the others several times)")


class PromptSetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="prompt file (.txt, .jsonl, I2P .csv) or toy:NAME")
    categories: list[str] | None = Field(None, description="I2P: keep prompts in any of these categories")
    min_nudity_percentage: float | None = Field(None, description="I2P: keep prompts above this nudity percentage")
    attack: PromptAttackConfig | None = Field(None, description="adversarial prompts (UnlearnDiffAtk): on every model the set "
                                              "is scored on, its prompts are attacked first, toward the unaligned base's images "
                                              "of them; a model scored with several seeds is attacked once, with the "
                                              "attack's own seed")


class GeneratedData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_set: str = Field(description="the study's prompt set the base model generates from")
    images_per_prompt: int = Field(8, gt=0)


class ScenarioSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    finetune: FinetuneConfig = Field(description="relapse finetune fields: data, method, steps, lr, rank, save_at, ...")
    generated_data: GeneratedData | None = Field(None, description="train on the base model's own generations instead of finetune.data")
    group: str = Field("fine-tuning", description="the report's table this scenario joins (e.g. benign, malicious)")
    prompt_sets: list[str] = Field(description="scored at step 0, every --save-at step and the last step")
    quality_sets: list[str] = Field(default_factory=list, description="scored at step 0 and the last step")
    defenses: list[str] | None = Field(None, description="the defenses it applies to (default: all)")
    after: str | None = Field(None, description="fine-tune the model an earlier scenario left at its last step instead of the "
                                                "defended model (benign domains in sequence)")

    def sweep(self) -> list[int]:
        return sorted({0, *self.finetune.save_at, self.finetune.steps})


class DetectorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "toy"
    options: dict = Field(default_factory=dict)
    label: str | None = Field(None, description="its name in tables (default: the name and its numeric options, nudenet@0.6)")

    @model_validator(mode="after")
    def _default_label(self) -> DetectorSpec:
        if self.label is None:  # weights paths stay out of the label: they would make tables unreadable
            numbers = [v for _, v in sorted(self.options.items()) if isinstance(v, int | float) and not isinstance(v, bool)]
            self.label = self.name + "".join(f"@{v}" for v in numbers)
        return self

    def settings(self) -> dict:
        """What decides its verdicts (the label does not)."""
        return self.model_dump(exclude={"label"})


class StoryColumn(BaseModel):
    """A column of the study's story table: one figure of every defense, the mean over seeds."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(description="the column's heading")
    scenario: str = Field("before", description="the scenario it reads (before: the defended model before any fine-tune)")
    step: int | None = Field(None, description="the fine-tune step it reads (default: the scenario's last)")
    prompt_set: str = Field(description="the prompt set it reads")
    metric: str = Field("target_rate", description="the metric: a rate is shown in %, a distance as it is")


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "study"
    model: str = "toy"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    align_once: bool = Field(False, description="align each defense once, with the first seed, and attack that one model "
                                                "with every seed (as a published checkpoint is one model); by default each "
                                                "seed aligns its own")
    align_seeds: list[int] | None = Field(None, min_length=1, description="align each defense once per seed listed here and "
                                          "attack every one of these models with every seed of `seeds` (3 x 3: intervals over "
                                          "alignments and attacks); rows name each aligned model DEFENSE@SEED")
    prompt_sets: dict[str, PromptSetSpec]
    defenses: dict[str, list[AlignStage] | DefenseSpec] = Field(
        default_factory=lambda: {"none": []}, description="each defense's alignment stages in order ([]: the unaligned base), "
                                                          "or {stages: [...], align_seeds: [...]}")
    before: list[str] = Field(default_factory=list, description="prompt sets scored on every defended model before fine-tuning")
    scenarios: dict[str, ScenarioSpec] = Field(default_factory=dict)
    concept_data: str | None = Field(None, description="images of the concept (imagefolder or toy:DOMAIN[:N]): each scenario's "
                                     "training data gets its Frechet distance to them, in the first detector with image "
                                     "features (how close a benign domain lies to the concept)")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    detectors: list[DetectorSpec] = Field(default_factory=lambda: [DetectorSpec()], min_length=1)
    reference: str | None = Field(None, description="real images (imagefolder or toy:DOMAIN[:N]) for a Frechet distance")
    reference_sets: list[str] = Field(default_factory=list, description="prompt sets whose images are compared with reference")
    story: list[StoryColumn] = Field(default_factory=list, max_length=7, description="the table the study ends with, "
                                     "printed last and first in its report: a row per defense, these columns (at most 7)")
    threads_per_step: int = Field(1, ge=1, description="CPU threads each step runs with, whatever runs it (one process or "
                                  "several, local or Ray, fresh or resumed): the order of a float sum, and so some rows, "
                                  "depend on it, so the rows are a function of the config and seeds alone")
    tracker: Tracker = Field(None, description="also send every training curve (RUN/steps/*/logs) and the study's rows "
                                                  "(RUN/logs/study) to this experiment tracker (accelerate's: tensorboard, "
                                                  "wandb, mlflow, aim, ...)")
    _source: SourceLines | None = PrivateAttr(None)

    def stages(self, defense: str) -> list:
        spec = self.defenses[defense]
        return spec.stages if isinstance(spec, DefenseSpec) else spec

    def alignments(self, defense: str, seed: int) -> list[int]:
        """The alignment seeds of ``defense`` that study seed ``seed`` attacks: the defense's own, every one of
        ``align_seeds``, the first seed's (``align_once``), or its own (the default). The unaligned base is one model."""
        spec = self.defenses[defense]
        if isinstance(spec, DefenseSpec):
            return spec.align_seeds
        if not spec:
            return [seed]  # nothing to align: the seed names nothing
        if self.align_once:
            return [self.seeds[0]]
        return self.align_seeds or [seed]

    def only(self, scenarios: list[str] | None = None, defenses: list[str] | None = None) -> StudyConfig:
        """This study cut down to a part rerun on its own, into a run folder of its own: ``scenarios`` (with the
        scenarios they continue, ``after``; ``before``: the rows before any attack alone) and the defenses they attack,
        and of those, ``defenses`` alone where given."""
        scenarios = list(self.scenarios) if scenarios is None else scenarios
        if unknown := sorted(set(scenarios) - set(self.scenarios) - {"before"}):
            raise UserError(f"the study has no scenarios {unknown}; choose among {['before', *sorted(self.scenarios)]}")
        if unknown := sorted(set(defenses or []) - set(self.defenses)):
            raise UserError(f"the study has no defenses {unknown}; choose among {sorted(self.defenses)}")
        wanted: set[str] = set()
        for name in scenarios:
            while name not in (None, "before") and name not in wanted:
                wanted.add(name)
                name = self.scenarios[name].after
        kept = {name: spec for name, spec in self.scenarios.items() if name in wanted}
        attacked = set(self.defenses) if "before" in scenarios else {d for spec in kept.values() for d in spec.defenses or self.defenses}
        attacked &= set(defenses or self.defenses)
        return self.model_copy(update={"scenarios": kept, "defenses": {d: s for d, s in self.defenses.items() if d in attacked}})

    @classmethod
    def from_yaml(cls, path: str | Path) -> StudyConfig:
        """Load and check a study file; a mistake found now or when planning names its key and line."""
        from relapse.config import load_yaml, validated

        data, source = load_yaml(path)
        config = validated(cls, data, source)
        config._source = source
        return config

    @property
    def source(self) -> SourceLines | None:
        """Where each key sat in the YAML file it came from (None for a config built in Python)."""
        return self._source

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        named = set(self.prompt_sets)
        scenario_sets = [(f"scenario {n}", s.prompt_sets + s.quality_sets + ([s.generated_data.prompt_set] if s.generated_data else []))
                         for n, s in self.scenarios.items()]
        for where, sets in [("before", self.before), ("reference_sets", self.reference_sets), *scenario_sets]:
            if unknown := sorted(set(sets) - named):
                raise ValueError(f"{where} names prompt sets {unknown} that prompt_sets does not define")
        for name in self.defenses:
            for stage in self.stages(name):
                if owned := sorted(stage.model_fields_set & set(STUDY_OWNED)):
                    raise ValueError(f"defense {name}: {owned} are set by the study; remove them from the stage")
        labels = [d.label for d in self.detectors]
        if repeated := sorted({label for label in labels if labels.count(label) > 1}):
            raise ValueError(f"detectors {repeated} share a label; give each a label of its own (detectors: - {{name: ..., label: ...}})")
        for column in self.story:
            if column.prompt_set not in named or (column.scenario != "before" and column.scenario not in self.scenarios):
                raise ValueError(f"story column {column.title!r} reads scenario {column.scenario!r} and prompt set "
                                 f"{column.prompt_set!r}: name a scenario (or before) and a prompt set the study defines")
        if self.align_once and self.align_seeds:
            raise ValueError("align_once and align_seeds both say how often to align: keep one")
        earlier: list[str] = []
        for name, scenario in self.scenarios.items():
            if scenario.after is not None and scenario.after not in earlier:
                raise ValueError(f"scenario {name} comes after {scenario.after!r}, which is not a scenario defined above it")
            if scenario.after is not None and set(scenario.defenses or self.defenses) - set(self.scenarios[scenario.after].defenses or self.defenses):
                raise ValueError(f"scenario {name} applies to defenses that scenario {scenario.after} does not; give it theirs")
            earlier.append(name)
            if unknown := sorted(set(scenario.defenses or []) - set(self.defenses)):
                raise ValueError(f"scenario {name} names defenses {unknown} that defenses does not define")
            if (scenario.finetune.data is not None) == (scenario.generated_data is not None):
                raise ValueError(f"scenario {name}: give its data as finetune.data or as generated_data, one of the two")
            if owned := sorted(scenario.finetune.model_fields_set & set(FINETUNE_STUDY_OWNED)):
                raise ValueError(f"scenario {name}: {owned} are set by the study; remove them from finetune")
            adversarial = [p for p in scenario.prompt_sets + scenario.quality_sets if self.prompt_sets[p].attack]
            if scenario.finetune.writes == "embedding" and adversarial:
                raise ValueError(f"scenario {name}: a textual inversion is asked for by its word, not by adversarial prompts; "
                                 f"score {adversarial} in another scenario")
        return self
