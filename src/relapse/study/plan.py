"""The study as a graph of steps (align -> fine-tune -> generate -> evaluate, and ``weights``: the
fine-tune's update against the alignment's), built without loading any weights. A step's key hashes its kind, its settings and its inputs' keys, so a step shared by
several cells (the aligned model's evaluation is step 0 of every scenario) is planned once, and a
rerun finds every finished step under ``RUN_DIR/steps/KIND-KEY``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import ClassVar

from relapse.config import SourceLines
from relapse.errors import UserError
from relapse.study.config import StudyConfig

SEED_STRIDE = 1000  # study seed s samples with sampler seed + 1000 s: seeds never share images
DATA_SEED_OFFSET = 500  # generated training data samples with seeds that evaluation never uses
TARGET_SEED_OFFSET = 700  # so do an adversarial attack's target images


@dataclass(eq=False)
class Step:
    """A unit of a study's work, under ``RUN_DIR/steps/KIND-KEY``: its settings (``spec``) and inputs (``deps``) decide
    its output, so its key hashes them. A kind of step is a subclass: its typed inputs, where its output goes and when
    it is done (``output``: ``run``, a training run folder, done once its ``final/`` is in place, as a stopped run leaves
    checkpoints to resume from; ``folder`` or ``json``, one output renamed into place when complete), and how it runs
    (:meth:`run`, on the :class:`~relapse.study.executor.Executor` that keeps models loaded between steps)."""

    label: str
    spec: dict  # everything besides its inputs that decides the output
    deps: list[Step] = field(default_factory=list)

    kind: ClassVar[str]
    output: ClassVar[str]  # run | folder | json
    first: ClassVar[int]  # scheduling order among ready steps: training first (long, and each unlocks many steps)
    device: ClassVar[bool]  # runs the model (an accelerator where there is one), or only reads results (a CPU)
    images: ClassVar[int] = 0  # images the step makes

    @cached_property
    def key(self) -> str:
        payload = json.dumps([self.kind, self.spec, [d.key for d in self.deps]], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def path(self, run_dir: Path) -> Path:
        return run_dir / "steps" / (f"{self.kind}-{self.key}" + (".json" if self.output == "json" else ""))

    def done(self, run_dir: Path) -> bool:
        path = self.path(run_dir)
        return (path / "final").is_dir() if self.output == "run" else path.exists()

    def models_read(self) -> list[ModelState]:
        """The models the step loads, each with its LoRAs fused (what its cost counts)."""
        return []

    def run(self, executor) -> None:
        raise NotImplementedError


@dataclass(eq=False)
class OnModel(Step):
    """A step that loads a model (``reads``: its base and LoRAs, as the steps that made them)."""

    reads: ModelState | None = None

    def models_read(self) -> list[ModelState]:
        return [self.reads]


@dataclass(eq=False)
class AlignStep(OnModel):
    """An alignment stage on ``reads``: a training run, a closed-form edit or a retraining (its method's ``run``)."""

    config: object = None  # the stage's typed config, less what the study sets when it runs
    kind, output, first, device = "align", "run", 0, True

    def run(self, executor) -> None:
        executor.align(self)


@dataclass(eq=False)
class FinetuneStep(OnModel):
    """A fine-tune of ``reads`` on its data (``data``: the generate step that made it, or else the config's source)."""

    data: GenerateStep | None = None
    config: object = None  # the fine-tune's typed config, less what the study sets when it runs
    kind, output, first, device = "finetune", "run", 1, True

    def run(self, executor) -> None:
        executor.finetune(self)


@dataclass(eq=False)
class AttackStep(OnModel):
    """Adversarial prompts against ``reads``, toward the images ``targets`` drew."""

    targets: GenerateStep | None = None
    config: object = None  # the prompt set's attack config
    kind, output, first, device = "attack", "folder", 2, True

    def run(self, executor) -> None:
        executor.attack(self)


@dataclass(eq=False)
class GenerateStep(OnModel):
    """Images of a prompt set on ``reads`` (``prompts``: the attack step that wrote them, for an adversarial set)."""

    images: int = 0
    prompts: AttackStep | None = None
    kind, output, first, device = "generate", "folder", 2, True

    def run(self, executor) -> None:
        executor.generate(self)


@dataclass(eq=False)
class EvaluateStep(Step):
    """A detector's verdicts and figures on the images of its one dependency, a generate step."""

    kind, output, first, device = "evaluate", "json", 3, False

    @property
    def images_scored(self) -> int:
        return sum(d.images for d in self.deps)

    def run(self, executor) -> None:
        executor.evaluate(self)


@dataclass(eq=False)
class WeightsStep(OnModel):
    """A fine-tune's update (``reads`` against ``before``) against its alignment's (``before`` against the base)."""

    before: ModelState | None = None
    kind, output, first, device = "weights", "json", 3, False

    def models_read(self) -> list[ModelState]:
        return [ModelState(Weights(model=self.spec["base"]["model"])), self.before, self.reads]

    def run(self, executor) -> None:
        executor.weights(self)


@dataclass(eq=False)
class DistanceStep(Step):
    """How far a scenario's training data (its dependency's images, or the config's source) lies from the concept's."""

    kind, output, first, device = "distance", "json", 3, False

    def run(self, executor) -> None:
        executor.distance(self)


STEP_KINDS: tuple[type[Step], ...] = (AlignStep, FinetuneStep, AttackStep, GenerateStep, EvaluateStep, WeightsStep, DistanceStep)


@dataclass(frozen=True)
class Weights:
    """A model folder or LoRA: the study's base, or a folder inside a step's output."""

    step: Step | None = None
    sub: str = ""
    model: str = ""

    def resolve(self, run_dir: Path) -> str:
        return self.model if self.step is None else str(self.step.path(run_dir) / self.sub)

    def describe(self) -> str:
        return self.model if self.step is None else f"{self.step.kind}-{self.step.key}/{self.sub}"


@dataclass(frozen=True)
class Embedding:
    """A textual inversion: the new word a step learned, and the prompt words it is asked in place of."""

    weights: Weights
    token: str
    replaces: tuple[str, ...] = ()

    def describe(self) -> dict:
        return {"weights": self.weights.describe(), "token": self.token, "replaces": list(self.replaces)}


@dataclass(frozen=True)
class ModelState:
    """W = model + sum of LoRAs (each at scale 1), fused at inference; with a learned word, prompts ask for it."""

    model: Weights
    loras: tuple[Weights, ...] = ()
    embedding: Embedding | None = None

    def producers(self) -> list[Step]:
        extra = (self.embedding.weights,) if self.embedding else ()
        return [w.step for w in (self.model, *self.loras, *extra) if w.step is not None]

    def describe(self) -> dict:
        described = {"model": self.model.describe(), "loras": [w.describe() for w in self.loras]}
        return described | ({"embedding": self.embedding.describe()} if self.embedding else {})  # keys without one unchanged

    def resolve(self, run_dir: Path) -> tuple[str, list[str]]:
        """Paths of the model folder and of each LoRA."""
        return self.model.resolve(run_dir), [w.resolve(run_dir) for w in self.loras]

    def with_output(self, step: Step, kind: str, sub: str = "") -> ModelState:
        """The state after a step that wrote full weights (they replace the model and the LoRAs fused into it; a guard
        stays, as it acts at sampling), a LoRA or a guard (added) or a learned word (a textual inversion: prompts ask for
        it where they named what it replaces)."""
        if kind == "full":
            return ModelState(Weights(step, sub), tuple(w for w in self.loras if is_guard(w)))
        if kind == "embedding":
            return ModelState(self.model, self.loras, Embedding(Weights(step, sub), step.config.token, tuple(step.config.replaces)))
        return ModelState(self.model, (*self.loras, Weights(step, sub)))


@dataclass(frozen=True)
class Cell:
    """One evaluated figure set: which row labels an evaluate step's result fills."""

    defense: str
    scenario: str
    step: int
    seed: int
    prompt_set: str
    detector: str
    evaluate: EvaluateStep


@dataclass(frozen=True)
class WeightCell:
    """Which rows a weights step's result fills: a fine-tune's update against its defense's."""

    defense: str
    scenario: str
    step: int
    seed: int
    weights: WeightsStep


@dataclass(frozen=True)
class AlignCell:
    """Which rows an alignment's record fills: how many steps it trained, and the residual it stopped at."""

    defense: str
    seed: int
    align: AlignStep


@dataclass(frozen=True)
class DistanceCell:
    """Which rows a distance step fills: how far a scenario's training data lies from the concept's images."""

    scenario: str
    seed: int
    detector: str
    distance: DistanceStep


@dataclass
class Plan:
    steps: list[Step]
    cells: list[Cell]
    weight_cells: list[WeightCell] = field(default_factory=list)
    align_cells: list[AlignCell] = field(default_factory=list)
    distance_cells: list[DistanceCell] = field(default_factory=list)


class Planner:
    def __init__(self, cfg: StudyConfig, source: SourceLines | None = None):
        self.cfg = cfg
        self.source = source  # the YAML file's key lines, for errors that name the line to fix
        # The Frechet distance is taken in the first detector that has image features (toy, or a CLIP's).
        from relapse.measure.detectors import DETECTORS

        self.fd_detector = next((d for d in cfg.detectors if hasattr(DETECTORS.get(d.name), "features")), None)  # unknown names fail here
        self.steps: dict[str, Step] = {}
        self.cells: list[Cell] = []
        self.weight_cells: list[WeightCell] = []
        self.align_cells: list[AlignCell] = []
        self.distance_cells: list[DistanceCell] = []
        self.finals: dict[tuple[str, str, int], ModelState] = {}  # the model each scenario leaves, for one that comes after it
        self.prompt_counts: dict[str, int] = {}
        self.fingerprints: dict[str, dict] = {}
        self.base = ModelState(Weights(model=cfg.model))

    def add(self, step: Step) -> Step:
        return self.steps.setdefault(step.key, step)

    def with_tracker(self, config):
        """A training step's config with the study's tracker (not in its key: where curves go changes no result)."""
        return config.model_copy(update={"tracker": self.cfg.tracker}) if self.cfg.tracker else config

    def align_stage(self, name: str, stage, state: ModelState, seed: int) -> tuple[ModelState, Step]:
        from relapse.align.forgetting import ForgettingConfig

        hardening = bool(state.loras) or state.model.step is not None
        written = stage.model_dump(mode="json", by_alias=True, exclude_unset=True)  # the step's key: what the user wrote
        if isinstance(stage, ForgettingConfig):
            written.setdefault("mode", "reinforcement" if hardening else "alignment")
            stage = stage.model_copy(update={"mode": written["mode"]})
        elif hardening:
            raise UserError(f"defense {name}: erasure stage {stage.method} must come first (it runs on the base model)")
        step = self.add(AlignStep(f"align {name}: {stage.method} (seed {seed})",
                             {"stage": written, "seed": seed, "on": state.describe()}, state.producers(), reads=state,
                             config=self.with_tracker(stage)))
        return state.with_output(step, stage.writes, "final"), step

    def detector_weights(self, detector) -> dict:
        """The fingerprint of the weights a detector reads, where it names them: a rebuilt evaluator gets new evaluations
        (its images, alignments and fine-tunes are kept)."""
        from relapse.measure.detectors import DETECTORS

        key = json.dumps(detector.settings(), sort_keys=True, default=str)
        if key not in self.fingerprints:
            fingerprint = getattr(DETECTORS.get(detector.name), "fingerprint", None)
            self.fingerprints[key] = {"weights": fingerprint(**detector.options)} if fingerprint else {}
        return self.fingerprints[key]

    def count_prompts(self, set_name: str) -> int:
        from relapse.data.prompts import read_prompts, select_prompts

        prompt_set = self.cfg.prompt_sets[set_name]
        if set_name not in self.prompt_counts:
            self.prompt_counts[set_name] = len(select_prompts(read_prompts(prompt_set.source), prompt_set.categories,
                                                              prompt_set.min_nudity_percentage))
            if not self.prompt_counts[set_name]:
                raise UserError(f"prompt set {set_name} ({prompt_set.source}) has no prompts left after its filters (categories "
                                f"{prompt_set.categories}, min_nudity_percentage {prompt_set.min_nudity_percentage}); widen them"
                                + (self.source.where(("prompt_sets", set_name)) if self.source else ""))
        return self.prompt_counts[set_name]

    def generate(self, state: ModelState, set_name: str, sampler, label: str, adversarial: bool = True) -> Step:
        """Images of a prompt set on a model; an adversarial set's prompts are first attacked on that model."""
        prompt_set = self.cfg.prompt_sets[set_name]
        # exclude_none: a resolution enters the key only where one is set, so studies run before it existed keep their keys
        spec = {"model": state.describe(), "prompts": prompt_set.model_dump(exclude={"attack"}),
                "sampler": sampler.model_dump(exclude_none=True)}
        attack = self.attack(state, set_name, label) if adversarial and prompt_set.attack else None
        return self.add(GenerateStep(label, spec, state.producers() + ([attack] if attack else []),
                             images=self.count_prompts(set_name) * sampler.images_per_prompt, reads=state, prompts=attack))

    def attack(self, state: ModelState, set_name: str, label: str) -> Step:
        """UnlearnDiffAtk on ``state``: the set's prompts, steered toward the unaligned base's images of them (drawn with
        seeds evaluation never uses). The attack draws with its own seed, so a model that several study seeds score (an
        aligned model under ``align_once``) is attacked once, as an attacker publishes one list of prompts, and each seed
        samples its images from that list."""
        prompt_set = self.cfg.prompt_sets[set_name]
        drawing = self.cfg.sampler.model_copy(update={"seed": self.cfg.sampler.seed + TARGET_SEED_OFFSET + SEED_STRIDE * prompt_set.attack.seed,
                                                      "images_per_prompt": 1})
        targets = self.generate(self.base, set_name, drawing, f"generate attack targets {set_name} (base)", adversarial=False)
        spec = {"attack": prompt_set.attack.model_dump(), "prompts": prompt_set.model_dump(exclude={"attack"}), "on": state.describe()}
        return self.add(AttackStep(label.replace("generate", "attack", 1), spec, state.producers() + [targets], reads=state,
                                   targets=targets, config=prompt_set.attack))

    def score(self, state: ModelState, set_name: str, seed: int, labels: dict) -> None:
        sampler = self.cfg.sampler.model_copy(update={"seed": self.cfg.sampler.seed + SEED_STRIDE * seed})
        generate = self.generate(state, set_name, sampler, f"generate {set_name} ({labels['defense']}, {labels['scenario']}, "
                                                           f"step {labels['step']}, seed {seed})")
        for detector in self.cfg.detectors:
            reference = self.cfg.reference if set_name in self.cfg.reference_sets and detector is self.fd_detector else None
            evaluate = self.add(EvaluateStep(f"evaluate {generate.label} with {detector.label}",
                                     {"detector": detector.settings(), "reference": reference} | self.detector_weights(detector),
                                     [generate]))
            self.cells.append(Cell(labels["defense"], labels["scenario"], labels["step"], seed, set_name, detector.label, evaluate))

    def generated_data(self, name: str, seed: int) -> Step | None:
        """The unaligned base model's own generations a scenario trains on (one step per study seed)."""
        wanted = self.cfg.scenarios[name].generated_data
        if wanted is None:
            return None
        sampler = self.cfg.sampler.model_copy(update={"seed": self.cfg.sampler.seed + SEED_STRIDE * seed + DATA_SEED_OFFSET,
                                                      "images_per_prompt": wanted.images_per_prompt})
        return self.generate(self.base, wanted.prompt_set, sampler, f"generate training data {wanted.prompt_set} (base, seed {seed})")

    def distance(self, name: str, seed: int, data: Step | None) -> None:
        """How far the scenario's training data lies from the concept's images, in the Frechet-distance detector's features."""
        if self.cfg.concept_data is None or self.fd_detector is None:
            return
        finetune = self.cfg.scenarios[name].finetune
        source = {"generated": data.key} if data else {"data": finetune.data, "data_seed": seed}
        spec = {"concept": self.cfg.concept_data, "detector": self.fd_detector.settings(), **source} | self.detector_weights(self.fd_detector)
        step = self.add(DistanceStep(f"distance of {name}'s data to the concept (seed {seed})", spec, [data] if data else []))
        if not any(c.scenario == name and c.seed == seed for c in self.distance_cells):  # once per scenario, not per defense
            self.distance_cells.append(DistanceCell(name, seed, self.fd_detector.label, step))

    def scenario(self, defense: str, name: str, aligned: ModelState, seed: int) -> None:
        spec = self.cfg.scenarios[name]
        state = self.finals[(defense, spec.after, seed)] if spec.after else aligned
        settings = spec.finetune.model_dump(mode="json", exclude_unset=True)  # the step's key: what the user wrote
        data = self.generated_data(name, seed)
        self.distance(name, seed, data)
        finetune = self.add(FinetuneStep(f"finetune {name} on {defense} (seed {seed})",
                                 {"finetune": settings, "seed": seed, "on": state.describe()} | ({"data": data.key} if data else {}),
                                 state.producers() + ([data] if data else []), reads=state, data=data,
                                 config=self.with_tracker(spec.finetune)))
        sweep = spec.sweep()
        kind = spec.finetune.writes
        for step in sweep:
            at = state if step == 0 else state.with_output(finetune, kind, "final" if step == sweep[-1] else f"step-{step:06d}")
            sets = spec.prompt_sets + (spec.quality_sets if step in (0, sweep[-1]) else [])
            for set_name in sets:
                self.score(at, set_name, seed, {"defense": defense, "scenario": name, "step": step})
        self.finals[(defense, name, seed)] = at
        if changes_weights(aligned) and kind != "embedding":  # nothing to undo, or a learned word that changes no weight
            self.weights(defense, name, seed, aligned, at, sweep[-1])

    def weights(self, defense: str, scenario: str, seed: int, before: ModelState, after: ModelState, step: int) -> None:
        weights = self.add(WeightsStep(f"weights {scenario} on {defense} (seed {seed})",
                                {"base": self.base.describe(), "before": before.describe(), "after": after.describe()},
                                after.producers(), reads=after, before=before))
        self.weight_cells.append(WeightCell(defense, scenario, step, seed, weights))

    def defended(self, defense: str, align_seed: int, several: bool) -> tuple[str, ModelState]:
        """The aligned model and its name in the rows (DEFENSE@SEED where ``several`` alignments of it are attacked)."""
        state, steps = self.base, []
        for stage in self.cfg.stages(defense):
            state, step = self.align_stage(defense, stage, state, align_seed)
            steps.append(step)
        named = f"{defense}@{align_seed}" if several else defense
        if not any(c.defense == named and c.seed == align_seed for c in self.align_cells):
            self.align_cells += [AlignCell(named, align_seed, step) for step in steps]
        return named, state

    def build(self) -> Plan:
        for seed in self.cfg.seeds:
            for defense in self.cfg.defenses:
                alignments = self.cfg.alignments(defense, seed)
                for align_seed in alignments:
                    named, state = self.defended(defense, align_seed, len(alignments) > 1)
                    for set_name in self.cfg.before:
                        self.score(state, set_name, seed, {"defense": named, "scenario": "before", "step": 0})
                    for name, spec in self.cfg.scenarios.items():
                        if spec.defenses is None or defense in spec.defenses:
                            self.scenario(named, name, state, seed)
        return Plan(list(self.steps.values()), self.cells, self.weight_cells, self.align_cells, self.distance_cells)


def is_guard(weights: Weights) -> bool:
    return isinstance(weights.step, AlignStep) and weights.step.config.writes == "guard"


def guards(state: ModelState) -> int:
    """The guards a model state carries (SLD): no weights, one more denoiser pass a sampling step each."""
    return sum(map(is_guard, state.loras))


def changes_weights(aligned: ModelState) -> bool:
    """Whether an aligned model's weights differ from its base's: not the base, nor the base under a guard."""
    return aligned.model.step is not None or len(aligned.loras) > guards(aligned)


def build_plan(cfg: StudyConfig, source: SourceLines | None = None) -> Plan:
    return Planner(cfg, source).build()
