"""``relapse generate``: images from a prompt set, deterministic per (prompt, seed).

Image ``k`` of every prompt uses seed ``seed + k`` (or the prompt's own seed + k), drawn by a
generator of its own, so an image never depends on the batch it was sampled in and the same
prompt and seed give the same image on every model: grids compare like with like.

Output: ``NNNN_KK.png`` files, ``manifest.jsonl`` (one line per image: prompt, seed, file and
settings) and ``run.json`` (config, versions). The folder appears only when complete.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from relapse.data.prompts import Prompt, read_prompts
from relapse.errors import UserError
from relapse.io import RUN_RECORD, atomic_dir, check_output_dir, run_record, write_json
from relapse.progress import progress

MANIFEST = "manifest.jsonl"


class SamplerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(20, gt=0, description="denoising steps")
    guidance: float = Field(5.0, ge=0, description="classifier-free guidance scale")
    images_per_prompt: int = Field(4, gt=0)
    seed: int = 0
    batch_size: int = Field(64, gt=0)


class GenerateConfig(SamplerConfig):
    model: str = "toy"
    prompts: str
    out: Path
    loras: list[Path] = Field(default_factory=list, description="LoRAs merged into the model and fused")
    lora_scales: list[float] = Field(default_factory=list, description="one scale per LoRA (default 1.0); may be negative")
    device: str | None = None


@dataclass(frozen=True)
class Job:
    prompt_index: int
    k: int
    prompt: Prompt
    seed: int
    guidance: float

    @property
    def file(self) -> str:
        return f"{self.prompt_index:04d}_{self.k:02d}.png"


def plan_jobs(prompts: list[Prompt], sampler: SamplerConfig) -> list[Job]:
    return [
        Job(i, k, p, (p.seed if p.seed is not None else sampler.seed) + k, p.guidance if p.guidance is not None else sampler.guidance)
        for i, p in enumerate(prompts)
        for k in range(sampler.images_per_prompt)
    ]


def batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Fixed-size batches of jobs that share a guidance scale (one pipeline call each)."""
    by_guidance: dict[float, list[Job]] = defaultdict(list)
    for job in jobs:
        by_guidance[job.guidance].append(job)
    return [group[i : i + batch_size] for group in by_guidance.values() for i in range(0, len(group), batch_size)]


def sample(pipe, jobs: list[Job], steps: int):
    """Run one pipeline call for a batch of jobs; returns PIL images in job order."""
    import torch

    device = pipe.device
    generators = [torch.Generator(device=device).manual_seed(job.seed) for job in jobs]
    return pipe(
        prompt=[job.prompt.text for job in jobs], num_inference_steps=steps, guidance_scale=jobs[0].guidance,
        generator=generators, output_type="pil",
    ).images


def shard_manifest(rank: int) -> str:
    return f"manifest-{rank:03d}.jsonl"


def generate_images(pipe, prompts: list[Prompt], sampler: SamplerConfig, out_dir: Path, settings: dict,
                    shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Sample every job into ``out_dir`` and return the manifest rows (also written as MANIFEST).

    ``shard=(rank, world)`` samples every world-th job from the rank-th on and writes its rows to a shard
    manifest; :func:`merge_manifests` joins them. Each image has its own generator, so a job's image does
    not depend on which process sampled it."""
    rank, world = shard
    jobs = plan_jobs(prompts, sampler)[rank::world]
    rows = []
    name = MANIFEST if world == 1 else shard_manifest(rank)
    with open(out_dir / name, "w", encoding="utf-8") as manifest, progress(total=len(jobs), desc="generate", unit="img", disable=rank != 0) as bar:
        for batch in batches(jobs, sampler.batch_size):
            for job, image in zip(batch, sample(pipe, batch, sampler.steps)):
                image.save(out_dir / job.file)
                row = {"file": job.file, "prompt": job.prompt.text, "prompt_index": job.prompt_index, "k": job.k,
                       "seed": job.seed, "guidance": job.guidance, "steps": sampler.steps, **settings, **job.prompt.meta}
                manifest.write(json.dumps(row) + "\n")
                rows.append(row)
            bar.update(len(batch))
    return rows


def merge_manifests(out_dir: Path, world: int) -> list[dict]:
    """Join the shard manifests of ``world`` processes into MANIFEST, in job order."""
    rows = []
    for rank in range(world):
        shard = out_dir / shard_manifest(rank)
        rows += [json.loads(line) for line in shard.read_text(encoding="utf-8").splitlines() if line.strip()]
        shard.unlink()
    rows.sort(key=lambda row: (row["prompt_index"], row["k"]))
    (out_dir / MANIFEST).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return rows


def run_generate(cfg: GenerateConfig) -> Path:
    from relapse.models.loading import load_pipeline
    from relapse.models.lora import merge_loras, resolve_lora_specs

    check_output_dir(cfg.out)
    prompts = read_prompts(cfg.prompts)
    specs = resolve_lora_specs(cfg.loras, cfg.lora_scales)
    pipe = load_pipeline(cfg.model, device=cfg.device)
    merge_loras(pipe, specs)
    settings = {"model": cfg.model, "loras": [[str(s.path), s.scale] for s in specs]}
    with atomic_dir(cfg.out) as tmp:
        rows = generate_images(pipe, prompts, cfg, tmp, settings)
        write_json(tmp / RUN_RECORD, run_record("generate", cfg, cfg.seed, n_images=len(rows)))
    return cfg.out


def read_manifest(images_dir: str | Path) -> list[dict]:
    path = Path(images_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{images_dir} has no {MANIFEST}; point --images at a folder written by `relapse generate`")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise UserError(f"{path} lists no images")
    return rows
