"""The study's steps, run: align, fine-tune, generate, evaluate and compare weights, each into its own output.

Under several processes (torchrun, accelerate launch) alignments and fine-tunes train data-parallel, and
generation and evaluation are sharded by image.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from relapse.io import publish, write_json
from relapse.study.plan import (
    AlignStep,
    AttackStep,
    DistanceStep,
    EvaluateStep,
    FinetuneStep,
    GenerateStep,
    ModelState,
    Step,
    WeightsStep,
)


def process_state():
    """accelerate's view of the processes: one, or several under `accelerate launch` / torchrun (gloo on CPU)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


class Executor:
    """Runs steps in plan order; keeps the last pipeline and detectors loaded between steps.

    Under several processes, alignments and fine-tunes train data-parallel, and generation and evaluation
    are sharded by image (each image has its own seed, so the images do not depend on the number of
    processes)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.pipe, self.pipe_state = None, None
        self.detectors: dict[str, object] = {}
        self.references: dict[str, object] = {}  # reference features by (reference, detector)
        self.processes = process_state()

    def run(self, step: Step) -> float:
        """Run one step; its wall time in seconds."""
        start = time.perf_counter()
        step.run(self)
        self.processes.wait_for_everyone()
        return time.perf_counter() - start

    def align(self, step: AlignStep) -> None:
        from relapse.align.api import run_align

        run_align(self.training_config(step))

    def finetune(self, step: FinetuneStep) -> None:
        from relapse.finetuning.base import run_finetune

        data = {"data": str(step.data.path(self.run_dir))} if step.data else {}
        run_finetune(self.training_config(step, data_seed=step.spec["seed"], **data))

    def training_config(self, step: Step, **more):
        """The step's config with what the study sets: the model and LoRAs it reads, its seed and run folder
        (resumed where a stopped run left checkpoints)."""
        model, loras = step.reads.resolve(self.run_dir)
        out = step.path(self.run_dir)
        resume = out.is_dir()
        self.processes.wait_for_everyone()  # every process decides before the main one creates the folder
        return step.config.model_copy(update={"model": model, "loras": [Path(p) for p in loras], "seed": step.spec["seed"],
                                              "out": out, "resume": resume, **more})

    def weights(self, step: WeightsStep) -> None:
        """The fine-tune's update against the alignment's (:mod:`relapse.measure.weight_space`)."""
        from relapse.measure.weight_space import fused_unet_weights, update, update_alignment

        if not self.processes.is_main_process:
            return
        base = fused_unet_weights(step.spec["base"]["model"], [])
        before = fused_unet_weights(*step.before.resolve(self.run_dir))
        after = fused_unet_weights(*step.reads.resolve(self.run_dir))
        write_json(step.path(self.run_dir), update_alignment(update(after, before), update(before, base)))

    def load(self, state: ModelState):
        """The pipeline of a model state (kept loaded while the next steps read the same one)."""
        from relapse.models.loading import load_model

        model, loras = state.resolve(self.run_dir)
        embedding = state.embedding and state.embedding.weights.resolve(self.run_dir)
        if self.pipe_state != (model, loras, embedding):
            self.pipe = load_model(model, loras, embeddings=[embedding] if embedding else []).pipe
            self.pipe_state = (model, loras, embedding)
        return self.pipe

    def generate(self, step: GenerateStep) -> None:
        """Each process samples its shard into one partial folder; the main process merges and renames it."""
        from relapse.attack.prompts import PROMPT_FILE
        from relapse.data.prompts import asking, read_prompts, with_token
        from relapse.sampling import SamplerConfig, generate_images, merge_manifests

        state = step.reads
        prompts = read_prompts(step.prompts.path(self.run_dir) / PROMPT_FILE) if step.prompts else self.prompt_set(step)
        if state.embedding:  # a textual inversion is asked for by its word
            prompts = [asking(p, with_token(p.text, state.embedding.token, state.embedding.replaces)) for p in prompts]
        model, loras = state.resolve(self.run_dir)
        out, world, main = step.path(self.run_dir), self.processes.num_processes, self.processes.is_main_process
        partial = out.with_name(out.name + ".partial")
        if main:
            shutil.rmtree(partial, ignore_errors=True)  # what a killed run left
            partial.mkdir(parents=True)
        self.processes.wait_for_everyone()
        generate_images(self.load(state), prompts, SamplerConfig(**step.spec["sampler"]), partial,
                        {"model": model, "loras": [[p, 1.0] for p in loras]}, shard=(self.processes.process_index, world))
        self.processes.wait_for_everyone()
        if main:
            if world > 1:
                merge_manifests(partial, world)
            publish(partial, out)

    @staticmethod
    def prompt_set(step: Step) -> list:
        """The prompts of the set a generate or attack step reads."""
        from relapse.data.prompts import read_prompts, select_prompts

        spec = step.spec["prompts"]
        return select_prompts(read_prompts(spec["source"]), spec["categories"], spec["min_nudity_percentage"])

    def attack(self, step: AttackStep) -> None:
        """Adversarial prompts against the step's model, toward its target images (:mod:`relapse.attack.prompts`); the
        main process attacks, as the attack is one batch."""
        from relapse.attack.prompts import attack_prompts, stored_targets, write_attack
        from relapse.io import atomic_dir, run_record

        if not self.processes.is_main_process:
            return
        prompts = self.prompt_set(step)
        targets = stored_targets(step.targets.path(self.run_dir), prompts)
        start = time.perf_counter()
        adversarial = attack_prompts(self.load(step.reads), step.config, prompts=prompts, targets=targets)
        record = run_record("attack prompts", step.config, step.config.seed, n_prompts=len(prompts), on=step.spec["on"],
                            attack_s=round(time.perf_counter() - start, 1))
        with atomic_dir(step.path(self.run_dir)) as tmp:
            write_attack(tmp, adversarial, targets, record)

    def detector(self, spec: dict):
        """Built once per process; building checks the detector's weights files."""
        from relapse.measure.detectors import build_detector

        label = json.dumps(spec, sort_keys=True)
        if label not in self.detectors:
            self.detectors[label] = build_detector(spec["name"], **spec["options"])
        return self.detectors[label]

    def reference(self, source: str, spec: dict, seed: int = 10_000):
        """A reference's features in a detector's space, once per run (drawn with a seed no training data uses)."""
        from relapse.data.datasets import load_dataset
        from relapse.measure.evaluate import reference_features

        key = json.dumps([source, spec], sort_keys=True)
        if key not in self.references:
            self.references[key] = reference_features(self.detector(spec), load_dataset(source, seed).images)
        return self.references[key]

    def distance(self, step: DistanceStep) -> None:
        """Frechet distance and CMMD between a scenario's training data and the concept's images, in the detector's features."""
        from relapse.data.datasets import load_dataset
        from relapse.measure.evaluate import reference_distances

        if not self.processes.is_main_process:
            return
        spec = step.spec
        data = load_dataset(step.deps[0].path(self.run_dir)) if step.deps else load_dataset(spec["data"], spec["data_seed"])
        features = self.detector(spec["detector"]).features(data.images)
        write_json(step.path(self.run_dir), reference_distances(features, self.reference(spec["concept"], spec["detector"]))
                   | {"n_images": len(data.images)})

    def evaluate(self, step: EvaluateStep) -> None:
        """Each process scores its shard of the images; the main process merges the verdicts in image
        order, adds the Frechet distance and writes the result in one rename."""
        from accelerate.utils import gather_object

        from relapse.measure.detectors import merge_detections
        from relapse.measure.evaluate import evaluation, load_images
        from relapse.sampling import asked, read_manifest

        spec, images_dir = step.spec["detector"], step.deps[0].path(self.run_dir)
        detector = self.detector(spec)
        rows = read_manifest(images_dir)
        mine = list(range(self.processes.process_index, len(rows), self.processes.num_processes))
        shard = [rows[i] for i in mine]
        found = detector.detect(load_images(images_dir, shard), [asked(r) for r in shard]) if shard else None
        parts = gather_object([(mine, found)])
        if not self.processes.is_main_process:
            return
        detections = merge_detections([p for p in parts if p[1] is not None], len(rows))
        reference = step.spec["reference"]
        result = evaluation(rows, detections, spec["name"], (self.reference(reference, spec), reference) if reference else None)
        write_json(step.path(self.run_dir), result | {"images": str(images_dir.relative_to(self.run_dir))})

