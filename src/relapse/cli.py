"""The ``relapse`` command line. Thin: each command builds a typed config (YAML via ``--config``,
then flags, which win) and calls the package. User errors print one line and exit 2."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from relapse.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Keep the safety alignment of text-to-image diffusion models from relapsing, and measure it.")
toy_app = typer.Typer(no_args_is_help=True, help="The embedded toy world and toy model.")
app.add_typer(toy_app, name="toy")
attack_app = typer.Typer(no_args_is_help=True, help="Attacks that are not fine-tuning: adversarial prompts.")
app.add_typer(attack_app, name="attack")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML file with the command's config; flags override it.")]
ModelOpt = Annotated[Optional[str], typer.Option(help="`toy`, a diffusers pipeline folder, or a hub id in the local cache.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Output directory (written atomically).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed.")]
StepsOpt = Annotated[Optional[int], typer.Option(help="Denoising steps.")]
GuidanceOpt = Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale.")]
PerPromptOpt = Annotated[Optional[int], typer.Option(help="Images per prompt (image k uses seed + k).")]
BatchOpt = Annotated[Optional[int], typer.Option(help="Images per pipeline call.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda, ... (default: cuda when available).")]
ResolutionOpt = Annotated[Optional[int], typer.Option(help="Image side in pixels (default: the model's own).")]
# The training engine's own flags, the same for every training command.
GradAccumOpt = Annotated[Optional[int], typer.Option(help="Gradient accumulation steps.")]
PrecisionOpt = Annotated[Optional[str], typer.Option(help="no, fp16 or bf16.")]
WeightsDtypeOpt = Annotated[Optional[str], typer.Option(help="fp32, bf16 or fp16: the dtype the weights load in.")]
CheckpointingOpt = Annotated[Optional[bool], typer.Option("--gradient-checkpointing", help="Recompute activations in the "
                                                          "backward pass: less memory, more time.")]
OptimizerOpt = Annotated[Optional[str], typer.Option(help="adamw, or adamw8bit (bitsandbytes, optional).")]
TrackerOpt = Annotated[Optional[str], typer.Option(help="Also log the losses to this tracker (tensorboard, wandb, mlflow, "
                                                        "aim, ...; into OUT/logs).")]
LrScheduleOpt = Annotated[Optional[str], typer.Option(help="constant, cosine or linear (decayed to 0 by the last step).")]
WarmupOpt = Annotated[Optional[int], typer.Option(help="Steps of linear learning-rate warm-up.")]
CheckpointOpt = Annotated[Optional[int], typer.Option(help="Resumable checkpoint every K steps.")]
ResumeOpt = Annotated[Optional[bool], typer.Option("--resume", help="Continue from the newest checkpoint in --out.")]


@toy_app.command("data")
def toy_data(
    domain: Annotated[str, typer.Argument(help="pretrain, clean, harmful, shapes, sketch or evaluator.")],
    out: Annotated[Path, typer.Option("--out", help="Dataset directory (imagefolder + metadata.jsonl).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a toy dataset in the imagefolder convention."""
    from relapse.data.datasets import write_imagefolder
    from relapse.data.toy_world import DOMAINS, sample_domain

    if domain not in DOMAINS:
        raise UserError(f"unknown toy domain {domain!r}; choose one of: {', '.join(DOMAINS)}")
    write_imagefolder(sample_domain(domain, n, seed), out, extra={"domain": domain})
    typer.echo(f"wrote {n} {domain} images to {out}")


@toy_app.command("build")
def toy_build(
    out: OutOpt = None,
    seed: SeedOpt = None,
    stage: Annotated[Optional[str], typer.Option(help="all (pipeline and evaluator), evaluator (only the evaluator, "
                                                      "on the VAE of the pipeline in --out) or unet (only a fresh UNet, on "
                                                      "the VAE and text encoder of --from, into a new --out).")] = None,
    without: Annotated[Optional[list[str]], typer.Option("--without", help="Leave every pretraining image of this fill "
                                                                           "out (repeatable): --stage unet --without "
                                                                           "checkered builds the never-learned model.")] = None,
    from_model: Annotated[Optional[str], typer.Option("--from", help="--stage unet: the pipeline whose VAE and text "
                                                                     "encoder it keeps (default: toy).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Train the toy pipeline and the toy evaluator from scratch (20-40 minutes on 2 CPU cores)."""
    from relapse.config import resolve_config
    from relapse.models.loading import TOY_MODEL
    from relapse.toy_build import ToyBuildConfig, build_toy

    cfg = resolve_config(ToyBuildConfig, config, seed=seed, stage=stage, without=without or None, from_model=from_model)
    if cfg.stage == "unet" and out is None:  # the default --out is the shipped model, which a retrained UNet must not replace
        raise UserError("--stage unet writes a new pipeline folder; pass it with --out")
    record = build_toy(cfg, out or TOY_MODEL)
    built = {"evaluator": "the toy evaluator", "unet": f"a UNet on {cfg.from_model}'s VAE and text encoder"}.get(
        cfg.stage, "the toy model and its evaluator")
    typer.echo(f"built {built} in {record['total_s']:.0f} s -> {out or TOY_MODEL}")


@app.command()
def generate(
    prompts: Annotated[Optional[str], typer.Option(help="Prompt file (.txt one per line, .jsonl) or toy:NAME.")] = None,
    out: OutOpt = None,
    model: ModelOpt = None,
    lora: Annotated[Optional[list[Path]], typer.Option(help="LoRA (diffusers format, safetensors) to merge; repeatable.")] = None,
    lora_scale: Annotated[Optional[list[float]], typer.Option(help="Scale per --lora, in order; may be negative.")] = None,
    embedding: Annotated[Optional[list[Path]], typer.Option(help="Textual inversion (learned_embeds.safetensors or a run "
                                                                 "folder) whose word the prompts use; repeatable.")] = None,
    images_per_prompt: PerPromptOpt = None,
    seed: SeedOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    batch_size: BatchOpt = None,
    resolution: ResolutionOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Generate images from a prompt set: PNGs plus manifest.jsonl and run.json."""
    from relapse.config import resolve_config
    from relapse.sampling import GenerateConfig, run_generate

    cfg = resolve_config(GenerateConfig, config, prompts=prompts, out=out, model=model, loras=lora or None,
                         lora_scales=lora_scale or None, embeddings=embedding or None, images_per_prompt=images_per_prompt, seed=seed, steps=steps,
                         guidance=guidance, batch_size=batch_size, resolution=resolution, device=device)
    typer.echo(f"images in {run_generate(cfg)}")


@app.command()
def evaluate(
    images: Annotated[Optional[Path], typer.Option(help="A folder written by `relapse generate`.")] = None,
    detector: Annotated[Optional[str], typer.Option(help="Detector: toy, nudenet, q16, laion_nsfw, laion_aesthetic or clip_score (weights paths go in --config's detector_options).")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Detector threshold, added to detector_options (nudenet: 0.45, 0.5 or 0.6 are usual).")] = None,
    reference: Annotated[Optional[str], typer.Option(help="Real images for a Frechet distance: imagefolder or toy:DOMAIN[:N].")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the result here as JSON.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Score generated images: target rate (95% Wilson interval), mean score, attribute accuracy."""
    import json

    from relapse.config import resolve_config
    from relapse.measure.evaluate import EvaluateConfig, run_evaluate

    cfg = resolve_config(EvaluateConfig, config, images=images, detector=detector, reference=reference, json_out=json_out)
    if threshold is not None:  # one option among those the config file may give (weights paths, classes)
        cfg = cfg.model_copy(update={"detector_options": cfg.detector_options | {"threshold": threshold}})
    result = run_evaluate(cfg)
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "per_image"}, indent=2))


@app.command()
def align(
    method: Annotated[str, typer.Argument(help="esd or sdd (concept erasure); lt or ng (forgetting defenses); resist (erasure "
                                               "trained against simulated fine-tuning); never-learned (the toy model's UNet "
                                               "retrained without the concept, the reference point).")],
    model: ModelOpt = None,
    concept: Annotated[Optional[list[str]], typer.Option(help="esd/sdd: a prompt naming the concept to erase; repeatable.")] = None,
    concept_prompts: Annotated[Optional[str], typer.Option(help="esd/sdd: a prompt file (or toy:NAME) whose prompts also name it.")] = None,
    clean: Annotated[Optional[str], typer.Option(help="lt/ng/resist: clean data, imagefolder or toy:DOMAIN[:N].")] = None,
    harmful: Annotated[Optional[str], typer.Option(help="lt/ng/resist: harmful data, imagefolder or toy:DOMAIN[:N].")] = None,
    benign: Annotated[Optional[str], typer.Option(help="resist: data of the simulated benign fine-tunes (default: --clean).")] = None,
    resist_weight: Annotated[Optional[float], typer.Option(help="resist: beta, weight of the erasure after the simulated attack.")] = None,
    keep_weight: Annotated[Optional[float], typer.Option(help="resist: weight of the clean distillation.")] = None,
    attack_steps: Annotated[Optional[list[int]], typer.Option(help="resist: steps of one simulated fine-tune; repeatable (one is drawn per attack).")] = None,
    inner_steps: Annotated[Optional[int], typer.Option(help="resist: attack steps per outer step (the attack carries on across steps).")] = None,
    mode: Annotated[Optional[str], typer.Option(help="lt/ng: alignment (from the base) or reinforcement (harden an aligned model).")] = None,
    lora: Annotated[Optional[list[Path]], typer.Option(help="lt/ng reinforcement: safety LoRA fused into --model first; repeatable.")] = None,
    lora_scale: Annotated[Optional[list[float]], typer.Option(help="Scale per --lora.")] = None,
    noise: Annotated[Optional[str], typer.Option(help="ng: fixed or dynamic harmful-noise mean.")] = None,
    mu: Annotated[Optional[float], typer.Option(help="ng: mean of the harmful noise.")] = None,
    lambda_: Annotated[Optional[float], typer.Option("--lambda", help="lt/ng: weight of the contrastive term.")] = None,
    lambda_c: Annotated[Optional[float], typer.Option(help="lt/ng: weight of the push from the clean centre.")] = None,
    margin: Annotated[Optional[float], typer.Option(help="lt/ng: margin l of the contrastive term.")] = None,
    lt_scale: Annotated[Optional[float], typer.Option(help="lt: R in x0 <- R x0 + b.")] = None,
    lt_shift: Annotated[Optional[float], typer.Option(help="lt: b in x0 <- R x0 + b.")] = None,
    harmful_weight: Annotated[Optional[float], typer.Option(help="lt/ng: weight of the harmful denoising term (-1: Eq. 6 read literally).")] = None,
    published_code: Annotated[Optional[bool], typer.Option("--published-code", help="lt/ng: reproduce the released code (no L_c gradient, zero harmful gradient).")] = None,
    as_: Annotated[Optional[str], typer.Option("--as", help="lora (a safety LoRA) or full (a full pipeline).")] = None,
    params: Annotated[Optional[str], typer.Option(help="xattn (ESD-x), noxattn (ESD-u) or all (the lt/ng default: the full UNet).")] = None,
    rank: Annotated[Optional[int], typer.Option(help="LoRA rank.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate.")] = None,
    eta: Annotated[Optional[float], typer.Option(help="esd: negative-guidance strength.")] = None,
    anchor: Annotated[Optional[str], typer.Option(help="esd/sdd: empty (as published) or strip (the prompt minus the --concept words).")] = None,
    sample_steps: Annotated[Optional[int], typer.Option(help="esd/sdd: steps of the sampler that makes x_t.")] = None,
    resolution: Annotated[Optional[int], typer.Option(help="esd/sdd: pixels of the x_t it samples (default: the model's own).")] = None,
    stop_at_rate: Annotated[Optional[float], typer.Option(help="esd/sdd/resist: stop once the concept rate on --stop-prompts is "
                                                               "at or below this fraction (default: train every step).")] = None,
    stop_prompts: Annotated[Optional[str], typer.Option(help="esd/sdd/resist: held-out prompts naming the concept, for "
                                                             "--stop-at-rate (a file or toy:NAME).")] = None,
    stop_every: Annotated[Optional[int], typer.Option(help="esd/sdd/resist: steps between two checks of --stop-at-rate "
                                                           "(default 1).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Training batch size (lt/ng: per class, clean and harmful).")] = None,
    lr_schedule: LrScheduleOpt = None,
    lr_warmup_steps: WarmupOpt = None,
    grad_accum: GradAccumOpt = None,
    mixed_precision: PrecisionOpt = None,
    weights_dtype: WeightsDtypeOpt = None,
    gradient_checkpointing: CheckpointingOpt = None,
    optimizer: OptimizerOpt = None,
    tracker: TrackerOpt = None,
    checkpoint_every: CheckpointOpt = None,
    resume: ResumeOpt = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Align a model: erase a concept (esd, sdd), make it forget under malicious fine-tuning (lt, ng), erase it
    against simulated fine-tuning (resist), or retrain the toy model without it (never-learned). Other fields of a
    method's config: --config YAML. Writes OUT/final: a safety LoRA (diffusers format) or a full pipeline, with its record."""
    from relapse.align import METHODS
    from relapse.align.api import run_align
    from relapse.config import resolve_config

    flags = dict(model=model, concept=concept or None, concept_prompts=concept_prompts, clean=clean, harmful=harmful,
                 benign=benign, resist_weight=resist_weight, keep_weight=keep_weight, attack_steps=attack_steps or None,
                 inner_steps=inner_steps,
                 mode=mode, loras=lora or None, lora_scales=lora_scale or None, noise=noise, mu=mu, lambda_=lambda_,
                 lambda_c=lambda_c, margin=margin, lt_scale=lt_scale, lt_shift=lt_shift, harmful_weight=harmful_weight,
                 published_code=published_code, out=out, params=params, rank=rank, steps=steps, lr=lr, eta=eta,
                 anchor=anchor, sample_steps=sample_steps, resolution=resolution, stop_at_rate=stop_at_rate,
                 stop_prompts=stop_prompts, stop_every=stop_every, batch_size=batch_size, lr_schedule=lr_schedule,
                 lr_warmup_steps=lr_warmup_steps, grad_accum=grad_accum,
                 mixed_precision=mixed_precision, weights_dtype=weights_dtype, gradient_checkpointing=gradient_checkpointing,
                 optimizer=optimizer, tracker=tracker, checkpoint_every=checkpoint_every, resume=resume, seed=seed, as_=as_)
    config_class = METHODS.get(method).config
    foreign = [name for name, value in flags.items() if value is not None and name not in config_class.model_fields]
    if foreign:
        names = ", ".join("--" + name.rstrip("_").replace("_", "-") for name in foreign)
        raise UserError(f"`align {method}` does not take {names}; `relapse align --help` says which method takes which flag")
    cfg = resolve_config(config_class, config, method=method, **flags)
    typer.echo(f"{cfg.method} ({cfg.as_}) -> {run_align(cfg)}")


@app.command()
def finetune(
    data: Annotated[Optional[str], typer.Option(help="Imagefolder dataset (metadata.jsonl) or toy:DOMAIN[:N].")] = None,
    method: Annotated[Optional[str], typer.Option(help="full, lora, modular or textual-inversion.")] = None,
    model: ModelOpt = None,
    lora: Annotated[Optional[list[Path]], typer.Option(help="Safety LoRA: fused first (full, lora) or composed later (modular).")] = None,
    lora_scale: Annotated[Optional[list[float]], typer.Option(help="Scale per --lora.")] = None,
    rank: Annotated[Optional[int], typer.Option(help="LoRA rank.")] = None,
    train_text_encoder: Annotated[Optional[bool], typer.Option("--train-text-encoder", help="lora/modular: also a LoRA on "
                                                               "the CLIP text encoders' attention.")] = None,
    token: Annotated[Optional[str], typer.Option(help="textual-inversion: the new word it learns, e.g. '<c>'.")] = None,
    replaces: Annotated[Optional[list[str]], typer.Option(help="textual-inversion: a caption word the token stands for; repeatable.")] = None,
    init_word: Annotated[Optional[str], typer.Option(help="textual-inversion: the word whose embedding starts the token's.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate.")] = None,
    batch_size: BatchOpt = None,
    lr_schedule: LrScheduleOpt = None,
    lr_warmup_steps: WarmupOpt = None,
    grad_accum: GradAccumOpt = None,
    mixed_precision: PrecisionOpt = None,
    weights_dtype: WeightsDtypeOpt = None,
    gradient_checkpointing: CheckpointingOpt = None,
    optimizer: OptimizerOpt = None,
    tracker: TrackerOpt = None,
    save_at: Annotated[Optional[str], typer.Option(help="Comma-separated steps to also save at, e.g. 20,100,200.")] = None,
    checkpoint_every: CheckpointOpt = None,
    resume: ResumeOpt = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Fine-tune (benign or malicious: the data decides): full, LoRA, Modular LoRA on the base, or a textual inversion
    (one new word, --token)."""
    from relapse.config import resolve_config
    from relapse.finetuning.base import FinetuneConfig, run_finetune

    try:
        steps_to_save = [int(s) for s in save_at.split(",") if s.strip()] if save_at else None
    except ValueError:
        raise UserError(f"--save-at takes comma-separated integers, got {save_at!r}") from None
    cfg = resolve_config(FinetuneConfig, config, data=data, method=method, model=model, loras=lora or None,
                         lora_scales=lora_scale or None, rank=rank, train_text_encoder=train_text_encoder, token=token, replaces=replaces or None, init_word=init_word,
                         steps=steps, lr=lr, lr_schedule=lr_schedule,
                         lr_warmup_steps=lr_warmup_steps, batch_size=batch_size,
                         grad_accum=grad_accum, mixed_precision=mixed_precision, weights_dtype=weights_dtype,
                         gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, tracker=tracker, save_at=steps_to_save,
                         checkpoint_every=checkpoint_every, resume=resume, seed=seed, out=out)
    typer.echo(f"fine-tuned ({cfg.method}) -> {run_finetune(cfg)}")


@app.command()
def audit(
    lora: Annotated[Optional[Path], typer.Argument(help="The LoRA to audit: a .safetensors file or a folder holding one "
                                                        "(diffusers, peft or kohya format).")] = None,
    model: ModelOpt = None,
    safety: Annotated[Optional[list[Path]], typer.Option(help="Safety LoRA fused into --model first; repeatable.")] = None,
    safety_scale: Annotated[Optional[list[float]], typer.Option(help="Scale per --safety.")] = None,
    base: Annotated[Optional[str], typer.Option(help="The unaligned model, when --model is a full-weights defense "
                                                     "(the pre-screen needs dW_safe).")] = None,
    prompts: Annotated[Optional[str], typer.Option(help="The concept's prompts (default on the toy model: toy:target_direct).")] = None,
    lora_prompts: Annotated[Optional[str], typer.Option(help="The LoRA's own prompts: the quality it is for.")] = None,
    fail_above: Annotated[Optional[float], typer.Option(help="FAIL (exit 1) when the target rate with the LoRA is above this.")] = None,
    detector: Annotated[Optional[str], typer.Option(help="Detector (default: toy on the toy model, nudenet otherwise).")] = None,
    screen_only: Annotated[Optional[bool], typer.Option("--screen-only", help="The weight-space pre-screen alone: no images, no verdict.")] = None,
    images_per_prompt: PerPromptOpt = None,
    seed: SeedOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Does LORA undo the safety alignment of the model it will run on? A weight-space pre-screen, then the target rate
    of the aligned model with and without it; PASS (exit 0) or FAIL (exit 1); OUT/audit.json and audit.html."""
    from relapse.config import resolve_config
    from relapse.verdict.audit import AuditConfig, run_audit

    cfg = resolve_config(AuditConfig, config, lora=lora, model=model, safety=safety or None, safety_scales=safety_scale or None,
                         base=base, prompts=prompts, lora_prompts=lora_prompts, fail_above=fail_above, detector=detector,
                         screen_only=screen_only, images_per_prompt=images_per_prompt, seed=seed, steps=steps,
                         guidance=guidance, batch_size=batch_size, device=device, out=out)
    result, folder = run_audit(cfg)
    screen = result["screen"]
    if screen:
        typer.echo(f"screen: cos(dW_lora, -dW_safe) {screen['cosine_to_undo']:+.3f}, projection {screen['projection_to_undo']:+.3f}, "
                   f"subspace share {screen['safe_subspace_share']:.3f}")
    if result["verdict"] is None:
        typer.echo(f"screened only -> {folder}")
        return
    rates = {key: result[key]["target_rate"] for key in ("aligned", "with_lora")}
    typer.echo(f"{result['verdict']}: target rate {100 * rates['with_lora']['rate']:.1f}% with the LoRA "
               f"({100 * rates['aligned']['rate']:.1f}% without; n = {rates['with_lora']['n']}), threshold "
               f"{100 * result['fail_above']:.1f}% -> {folder}")
    if result["verdict"] == "FAIL":
        raise typer.Exit(1)


@attack_app.command("prompts")
def attack_prompts(
    prompts: Annotated[Optional[str], typer.Option(help="The prompts to attack: a prompt file or toy:NAME.")] = None,
    model: ModelOpt = None,
    lora: Annotated[Optional[list[Path]], typer.Option(help="Safety LoRA fused into --model: the alignment attacked; repeatable.")] = None,
    lora_scale: Annotated[Optional[list[float]], typer.Option(help="Scale per --lora.")] = None,
    targets: Annotated[Optional[Path], typer.Option(help="A `relapse generate` folder over the same prompts: image k=0 of "
                                                         "each prompt is what the attack steers toward.")] = None,
    target_model: Annotated[Optional[str], typer.Option(help="The unaligned model that draws the targets when --targets is "
                                                             "not given (default: --model without its LoRAs).")] = None,
    target_steps: Annotated[Optional[int], typer.Option(help="Denoising steps of the targets' sampler.")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale of the targets' sampler.")] = None,
    tokens: Annotated[Optional[int], typer.Option(help="Adversarial tokens put in front of each prompt.")] = None,
    iterations: Annotated[Optional[int], typer.Option(help="Optimizer steps (every prompt at once).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam's learning rate on the token vectors.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Adam's weight decay on the token vectors.")] = None,
    noise_draws: Annotated[Optional[int], typer.Option(help="(timestep, noise) pairs per prompt per iteration.")] = None,
    eval_draws: Annotated[Optional[int], typer.Option(help="Fixed (timestep, noise) pairs per prompt that score the prompts.")] = None,
    check_every: Annotated[Optional[int], typer.Option(help="Iterations between scorings; the best prompt scored is kept.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Prompts per forward/backward pass.")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Adversarial prompts (UnlearnDiffAtk): a few words in front of each prompt, searched so that the aligned model
    draws the concept again. Writes OUT/prompts.jsonl (read it with --prompts), OUT/targets/ and OUT/run.json."""
    from relapse.attack.prompts import PROMPT_FILE, AttackPromptsConfig, run_attack_prompts
    from relapse.config import resolve_config
    from relapse.data.prompts import read_prompts

    cfg = resolve_config(AttackPromptsConfig, config, prompts=prompts, model=model, loras=lora or None,
                         lora_scales=lora_scale or None, targets=targets, target_model=target_model, target_steps=target_steps,
                         guidance=guidance, tokens=tokens, iterations=iterations, lr=lr, weight_decay=weight_decay,
                         noise_draws=noise_draws, eval_draws=eval_draws, check_every=check_every, batch_size=batch_size,
                         seed=seed, device=device, out=out)
    file = run_attack_prompts(cfg) / PROMPT_FILE
    attacked = read_prompts(file)
    start, end = (sum(p.meta[key] for p in attacked) / len(attacked) for key in ("attack_loss_start", "attack_loss"))
    typer.echo(f"{len(attacked)} adversarial prompts in {file} (mean denoising loss on the target {start:.4f} -> {end:.4f})")


@app.command()
def study(
    config: Annotated[Path, typer.Argument(help="The study's YAML config (see configs/).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default: runs/<study name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed or finished run in --out.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (steps, cached, images) without loading weights.")] = False,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Steps run side by side, each in its own process.")] = 1,
    executor: Annotated[str, typer.Option("--executor", help="local (--workers processes here) or ray (tasks of a Ray "
                                                              "cluster; pip install 'relapse[ray]').")] = "local",
    address: Annotated[Optional[str], typer.Option("--address", help="ray: the cluster to join (auto, ray://host:port); "
                                                                      "default: start one on this machine.")] = None,
    scenarios: Annotated[Optional[list[str]], typer.Option("--scenario", help="Run only this scenario, with those it continues "
                                                           "and the defenses it attacks (repeatable; default: all); give "
                                                           "the part its own --out.")] = None,
) -> None:
    """Run a resilience study: align -> fine-tune -> generate -> evaluate, each step once, cached by its inputs."""
    from relapse.study.run import StudyRunConfig, run_study

    run_study(StudyRunConfig(config=config, out=out, resume=resume, dry_run=dry_run, workers=workers, executor=executor,
                             address=address, scenarios=scenarios or None))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A folder written by `relapse study`.")]) -> None:
    """Rebuild RUN_DIR/report.html from its results.json (with the labels `relapse review` keeps), recomputing nothing."""
    typer.echo(f"report in {rebuild_report(run_dir)}")


def rebuild_report(run_dir: Path) -> Path:
    from relapse.report.study_report import build_report
    from relapse.study.results import refresh_human_rows

    refresh_human_rows(run_dir)
    return build_report(run_dir)


@app.command()
def review(
    run_dir: Annotated[Path, typer.Argument(help="A folder written by `relapse study`.")],
    per_cell: Annotated[Optional[int], typer.Option(help="Images drawn from each cell (default 30).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the draw and of the blind order (default 0).")] = None,
    cells: Annotated[Optional[list[str]], typer.Option("--cells", help="Cells to draw from: KEY=VALUE[|VALUE...] joined by "
                                                       "commas (keys defense, scenario, step: a number or last, seed, "
                                                       "prompt_set); repeatable. Default: the study's first seed, before "
                                                       "fine-tuning and at each scenario's last step.")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to serve the page on (default 127.0.0.1: this machine only).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port to serve the page on (default 8765).")] = None,
    labeller: Annotated[Optional[str], typer.Option(help="Labeller of --import rows that name none.")] = None,
    import_csv: Annotated[Optional[Path], typer.Option("--import", help="Add the labels of a CSV (token or image, label, "
                                                                        "labeller columns), then exit.")] = None,
    export_csv: Annotated[Optional[Path], typer.Option("--export", help="Write every current label to a CSV, then exit.")] = None,
    sheets: Annotated[Optional[Path], typer.Option("--sheets", help="Write the sample as numbered contact sheets (PNG) and a "
                                                                    "labels.csv to fill in, then exit.")] = None,
    per_sheet: Annotated[Optional[int], typer.Option(help="Images per contact sheet (default 48).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Label a blind sample of a study's images (concept / trace / none / unusable) on a local web page, or on contact
    sheets; the labels go to RUN_DIR/review/labels.sqlite, and the report shows them beside the detectors'."""
    from relapse.config import resolve_config
    from relapse.review.run import ReviewConfig, run_review

    cfg = resolve_config(ReviewConfig, config, run=run_dir, per_cell=per_cell, seed=seed, cells=cells or None, host=host,
                         port=port, labeller=labeller, import_csv=import_csv, export_csv=export_csv, sheets=sheets,
                         per_sheet=per_sheet)
    typer.echo(run_review(cfg))
    if cfg.adds_labels:
        typer.echo(f"report in {rebuild_report(cfg.run)}")


@app.command()
def demo(
    out: OutOpt = None,
    model: ModelOpt = None,
    images_per_prompt: PerPromptOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Generate and evaluate clean and target prompt sets on the toy model; print a table, write a grid."""
    from relapse.config import resolve_config
    from relapse.study.demo import DemoConfig, run_demo

    run_demo(resolve_config(DemoConfig, config, out=out, model=model, images_per_prompt=images_per_prompt,
                            steps=steps, guidance=guidance, seed=seed))


def show_warnings() -> None:
    """The library logs its warnings (``logging``); the CLI shows relapse's own, one line each, and no one else's."""
    logger = logging.getLogger("relapse")
    if not any(getattr(h, "relapse_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        handler.relapse_cli = True
        logger.addHandler(handler)


def main() -> None:
    show_warnings()
    try:
        app()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
