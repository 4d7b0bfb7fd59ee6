"""Images from a prompt set, deterministic per (prompt, seed): :func:`generate` in memory, ``relapse generate`` to a folder.

Image ``k`` of every prompt uses seed ``seed + k`` (or the prompt's own seed + k), drawn by a
generator of its own, so an image does not depend on the batch it was sampled in (up to float rounding) and the same
prompt and seed give the same image on every model: grids compare like with like.

Output: ``NNNN_KK.png`` files, ``manifest.jsonl`` (one line per image: prompt, seed, file and
settings) and ``run.json`` (config, versions). The folder appears only when complete.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from relapse.data.prompts import Prompt, read_prompts
from relapse.errors import UserError
from relapse.io import MANIFEST, RUN_RECORD, atomic_dir, check_output_dir, run_record, write_json
from relapse.progress import progress


class SamplerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(20, gt=0, description="denoising steps")
    guidance: float = Field(5.0, ge=0, description="classifier-free guidance scale (a guidance-distilled model's "
                                                    "guidance embedding, FLUX.1-dev)")
    force_guidance: float | None = Field(None, ge=0, description="every image at this guidance, whatever its prompt says "
                                                                 "(I2P's per-prompt scales were set for SD 1.4; FLUX.1-dev "
                                                                 "wants its embedded guidance near 3.5)")
    resolution: int | None = Field(None, gt=0, description="image side in pixels (default: the model's own)")
    images_per_prompt: int = Field(4, gt=0, description="images per prompt (image k uses seed + k)")
    seed: int = Field(0, description="seed of a prompt's first image (a prompt's own seed wins)")
    batch_size: int = Field(64, gt=0, description="images per pipeline call (the images do not depend on it)")


class GenerateConfig(SamplerConfig):
    model: str = Field("toy", description="toy, a diffusers pipeline folder, or a hub id in the local cache")
    prompts: str = Field(description="prompt file (.txt one per line, .jsonl) or toy:NAME")
    out: Path = Field(description="output folder (written in one rename)")
    loras: list[Path] = Field(default_factory=list, json_schema_extra={"flag": "lora"}, description="LoRAs merged into the model and fused")
    lora_scales: list[float] = Field(default_factory=list, json_schema_extra={"flag": "lora_scale"}, description="one scale per LoRA (default 1.0); may be negative")
    embeddings: list[Path] = Field(default_factory=list, json_schema_extra={"flag": "embedding"}, description="textual inversions: each new word joins the tokenizer, "
                                                                     "and prompts ask for it by name")
    device: str | None = Field(None, description="cpu, cuda, ... (default: cuda when available)")


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
        Job(i, k, p, (p.seed if p.seed is not None else sampler.seed) + k, guidance_of(p, sampler))
        for i, p in enumerate(prompts)
        for k in range(sampler.images_per_prompt)
    ]


def guidance_of(prompt: Prompt, sampler: SamplerConfig) -> float:
    """The sampler's forced guidance, else the prompt's own (I2P), else the sampler's."""
    if sampler.force_guidance is not None:
        return sampler.force_guidance
    return prompt.guidance if prompt.guidance is not None else sampler.guidance


def batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Fixed-size batches of jobs that share a guidance scale (one pipeline call each)."""
    by_guidance: dict[float, list[Job]] = defaultdict(list)
    for job in jobs:
        by_guidance[job.guidance].append(job)
    return [group[i : i + batch_size] for group in by_guidance.values() for i in range(0, len(group), batch_size)]


def sample(pipe, jobs: list[Job], steps: int, resolution: int | None = None):
    """Run one pipeline call for a batch of jobs; returns PIL images in job order."""
    import torch

    from relapse.models.families import family_of
    from relapse.models.guards import guarding

    device = pipe.device
    generators = [torch.Generator(device=device).manual_seed(job.seed) for job in jobs]
    with guarding(pipe, steps):
        return pipe(
            prompt=[job.prompt.text for job in jobs], num_inference_steps=steps, guidance_scale=jobs[0].guidance,
            generator=generators, output_type="pil", **family_of(pipe).call_kwargs(resolution),
        ).images


def shard_manifest(rank: int) -> str:
    return f"manifest-{rank:03d}.jsonl"


def sample_jobs(pipe, jobs: list[Job], sampler: SamplerConfig, settings: dict, show: bool = True) -> Iterator[tuple[object, dict]]:
    """Sample ``jobs`` in batches; yield each PIL image with its manifest row (prompt, seed, settings), in job order."""
    with progress(total=len(jobs), desc="generate", unit="img", disable=not show) as bar:
        for batch in batches(jobs, sampler.batch_size):
            for job, image in zip(batch, sample(pipe, batch, sampler.steps, sampler.resolution)):
                yield image, {"file": job.file, "prompt": job.prompt.text, "prompt_index": job.prompt_index, "k": job.k,
                              "seed": job.seed, "guidance": job.guidance, "steps": sampler.steps, **settings, **job.prompt.meta}
            bar.update(len(batch))


def generate_images(pipe, prompts: list[Prompt], sampler: SamplerConfig, out_dir: Path, settings: dict,
                    shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Sample every job into ``out_dir`` and return the manifest rows (also written as MANIFEST).

    ``shard=(rank, world)`` samples every world-th job from the rank-th on and writes its rows to a shard
    manifest; :func:`merge_manifests` joins them. Each image has its own generator, so a job's image does
    not depend on which process sampled it."""
    rank, world = shard
    rows = []
    name = MANIFEST if world == 1 else shard_manifest(rank)
    with open(out_dir / name, "w", encoding="utf-8") as manifest:
        for image, row in sample_jobs(pipe, plan_jobs(prompts, sampler)[rank::world], sampler, settings, show=rank == 0):
            image.save(out_dir / row["file"])
            manifest.write(json.dumps(row) + "\n")
            rows.append(row)
    return rows


@dataclass
class Generation:
    """Images sampled in memory (PIL, in job order) and their manifest rows: what :func:`generate` returns."""

    images: list
    rows: list[dict]

    @property
    def prompts(self) -> list[str]:
        return [row["prompt"] for row in self.rows]

    def save(self, out: str | Path) -> Path:
        """Write the images and ``manifest.jsonl`` as ``relapse generate`` does (the folder appears complete)."""
        out = Path(out)
        check_output_dir(out)
        with atomic_dir(out) as tmp:
            for image, row in zip(self.images, self.rows):
                image.save(tmp / row["file"])
            write_manifest(tmp, self.rows)
        return out


def as_prompts(prompts: str | Path | list) -> list[Prompt]:
    """A prompt source (a file, ``toy:NAME``), or a list of texts or :class:`Prompt` objects."""
    if isinstance(prompts, (str, Path)):
        return read_prompts(prompts)
    return [p if isinstance(p, Prompt) else Prompt(str(p)) for p in prompts]


def generate(pipe, config: SamplerConfig | None = None, *, prompts: str | Path | list) -> Generation:
    """Sample images from ``pipe`` in memory.

    Args:
        pipe: a pipeline (SD, SDXL, SD 3.x or FLUX.1, e.g. from :func:`relapse.load`), LoRAs already applied.
        config: the sampler (steps, guidance, images per prompt, seed, batch size, resolution); default
            :class:`SamplerConfig`'s. Image ``k`` of a prompt uses seed ``seed + k`` (or the prompt's own seed + k); the
            images do not depend on the batch size (up to float rounding).
        prompts: a list of prompt texts, or a prompt source: a text/JSONL/I2P-CSV file or ``toy:NAME``
            (e.g. ``toy:target_direct``).

    Returns:
        A :class:`Generation`: ``images`` (PIL) and ``rows`` (prompt, seed, file name, settings), in the same order.

    Example:
        >>> pipe = relapse.load("toy")
        >>> out = relapse.generate(pipe, relapse.SamplerConfig(images_per_prompt=2, steps=8), prompts=["a checkered red star"])
        >>> len(out.images), out.rows[1]["seed"]
        (2, 1)
    """
    sampler = config or SamplerConfig()
    images, rows = [], []
    for image, row in sample_jobs(pipe, plan_jobs(as_prompts(prompts), sampler), sampler, settings={}):
        images.append(image)
        rows.append(row)
    return Generation(images, rows)


def write_manifest(out_dir: Path, rows: list[dict]) -> None:
    (out_dir / MANIFEST).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def merge_manifests(out_dir: Path, world: int) -> list[dict]:
    """Join the shard manifests of ``world`` processes into MANIFEST, in job order."""
    rows = []
    for rank in range(world):
        shard = out_dir / shard_manifest(rank)
        rows += [json.loads(line) for line in shard.read_text(encoding="utf-8").splitlines() if line.strip()]
        shard.unlink()
    rows.sort(key=lambda row: (row["prompt_index"], row["k"]))
    write_manifest(out_dir, rows)
    return rows


def run_generate(cfg: GenerateConfig) -> Path:
    from relapse.models.loading import load_model

    check_output_dir(cfg.out)
    prompts = read_prompts(cfg.prompts)
    loaded = load_model(cfg.model, cfg.loras, cfg.lora_scales, cfg.embeddings, device=cfg.device)
    settings = {"model": cfg.model, "loras": [[s.label, s.scale] for s in loaded.loras]} | (
        {"embeddings": loaded.words} if loaded.words else {})
    with atomic_dir(cfg.out) as tmp:
        rows = generate_images(loaded.pipe, prompts, cfg, tmp, settings)
        write_json(tmp / RUN_RECORD, run_record("generate", cfg, cfg.seed, n_images=len(rows)))
    return cfg.out


def asked(row: dict) -> str:
    """What an image's prompt asks for: its own words, or, where a learned word or adversarial tokens reworded it, the
    words it had before (:func:`relapse.data.prompts.asking`)."""
    return row.get("asks", row["prompt"])


def read_manifest(images_dir: str | Path) -> list[dict]:
    path = Path(images_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{images_dir} has no {MANIFEST}; point --images at a folder written by `relapse generate`")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise UserError(f"{path} lists no images")
    return rows
