"""The ``relapse`` command line. Thin: each command builds a typed config (YAML via ``--config``,
then flags, which win) and calls the package. User errors print one line and exit 2."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ClassVar, Optional

import typer
from typer.core import TyperGroup

from relapse.errors import UserError


class RegisteredCommands(TyperGroup):
    """A group whose commands are made from a registry when first asked for: registering imports torch, which
    ``relapse --help`` need not wait for."""

    make: ClassVar[Callable[[], typer.Typer]]
    loaded = False

    def load(self) -> None:
        if not self.loaded:
            self.loaded = True
            self.commands.update(typer.main.get_group(type(self).make()).commands)

    def list_commands(self, ctx):
        self.load()
        return super().list_commands(ctx)

    def get_command(self, ctx, name):
        self.load()
        return super().get_command(ctx, name)


class TopCommands(RegisteredCommands):
    make = staticmethod(lambda: top_commands())


class AttackCommands(RegisteredCommands):
    make = staticmethod(lambda: attack_commands())


app = typer.Typer(cls=TopCommands, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Keep the safety alignment of text-to-image diffusion models from relapsing, and measure it.")
toy_app = typer.Typer(cls=TopCommands, no_args_is_help=True, help="The embedded toy world and toy model.")
app.add_typer(toy_app, name="toy", cls=TyperGroup)
attack_app = typer.Typer(cls=TopCommands, no_args_is_help=True, help="Attacks that are not fine-tuning: adversarial prompts.")
app.add_typer(attack_app, name="attack", cls=AttackCommands)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML file with the command's config; flags override it.")]
ModelOpt = Annotated[Optional[str], typer.Option(help="`toy`, a diffusers pipeline folder, or a hub id in the local cache.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Output directory (written atomically).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed.")]
StepsOpt = Annotated[Optional[int], typer.Option(help="Denoising steps.")]
GuidanceOpt = Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale.")]
PerPromptOpt = Annotated[Optional[int], typer.Option(help="Images per prompt (image k uses seed + k).")]
BatchOpt = Annotated[Optional[int], typer.Option(help="Images per pipeline call.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda, ... (default: cuda when available).")]



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


def print_generated(cfg) -> None:
    from relapse.sampling import run_generate

    typer.echo(f"images in {run_generate(cfg)}")


def print_finetuned(cfg) -> None:
    from relapse.finetuning.base import run_finetune

    typer.echo(f"fine-tuned ({cfg.method}) -> {run_finetune(cfg)}")


def print_evaluated(cfg) -> None:
    import json

    from relapse.measure.evaluate import run_evaluate

    result = run_evaluate(cfg)
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "per_image"}, indent=2))


def print_audit(cfg) -> None:
    from relapse.verdict.audit import run_audit

    result, folder = run_audit(cfg)
    screen = result.screen
    if screen:
        typer.echo(f"screen: cos(dW_lora, -dW_safe) {screen['cosine_to_undo']:+.3f}, projection {screen['projection_to_undo']:+.3f}, "
                   f"subspace share {screen['safe_subspace_share']:.3f}")
    if result.verdict is None:
        typer.echo(f"screened only -> {folder}")
        return
    with_lora, aligned = result.with_lora.target_rate, result.aligned.target_rate
    typer.echo(f"{result.verdict}: target rate {100 * with_lora.rate:.1f}% with the LoRA ({100 * aligned.rate:.1f}% without; "
               f"n = {with_lora.n}), threshold {100 * result.fail_above:.1f}% -> {folder}")
    if result.verdict == "FAIL":
        raise typer.Exit(1)


def print_attacked(cfg) -> None:
    from relapse.attack.prompts import PROMPT_FILE, run_attack_prompts
    from relapse.data.prompts import read_prompts

    file = run_attack_prompts(cfg) / PROMPT_FILE
    attacked = read_prompts(file)
    start, end = (sum(p.meta[key] for p in attacked) / len(attacked) for key in ("attack_loss_start", "attack_loss"))
    typer.echo(f"{len(attacked)} adversarial prompts in {file} (mean denoising loss on the target {start:.4f} -> {end:.4f})")


def top_commands() -> typer.Typer:
    """The top-level commands whose flags are one config class's fields: ``generate``, ``finetune``, ``evaluate`` and
    ``audit``."""
    from relapse.cli_options import config_command
    from relapse.finetuning.base import FinetuneConfig
    from relapse.measure.evaluate import EvaluateConfig, EvaluateRunConfig
    from relapse.sampling import GenerateConfig, SamplerConfig
    from relapse.train.engine import TrainConfig
    from relapse.verdict.audit import AuditRunConfig

    commands = typer.Typer()
    commands.command("generate")(config_command(GenerateConfig, print_generated, (
        "Generate images from a prompt set: PNGs plus manifest.jsonl and run.json."), common=(SamplerConfig, "Sampler")))
    commands.command("finetune")(config_command(FinetuneConfig, print_finetuned, (
        "Fine-tune (benign or malicious: the data decides): full, LoRA, Modular LoRA on the base, or a textual inversion "
        "(one new word, --token)."), common=(TrainConfig, "Every training run")))
    commands.command("evaluate")(config_command(EvaluateRunConfig, print_evaluated, (
        "Score generated images: target rate (95% Wilson interval), mean score, attribute accuracy."),
        common=(EvaluateConfig, "Scoring")))
    commands.command("audit")(config_command(AuditRunConfig, print_audit, (
        "Does LORA undo the safety alignment of the model it will run on? A weight-space pre-screen, then the target rate "
        "of the aligned model with and without it; PASS (exit 0) or FAIL (exit 1); OUT/audit.json and audit.html."),
        common=(SamplerConfig, "Sampler"), arguments=("lora",)))
    return commands


def attack_commands() -> typer.Typer:
    from relapse.attack.prompts import AttackPromptsConfig, PromptAttackConfig
    from relapse.cli_options import config_command

    commands = typer.Typer()
    commands.command("prompts")(config_command(AttackPromptsConfig, print_attacked, (
        "Adversarial prompts (UnlearnDiffAtk): a few words in front of each prompt, searched so that the aligned model "
        "draws the concept again. Writes OUT/prompts.jsonl (read it with --prompts), OUT/targets/ and OUT/run.json."),
        common=(PromptAttackConfig, "The search")))
    return commands


def method_summary(method: type) -> str:
    """The first paragraph of the docstring of the module that defines ``method``: its name, paper and what it does."""
    import inspect

    return (inspect.getdoc(sys.modules[method.__module__]) or "").split("\n\n")[0]


def print_aligned(cfg) -> None:
    from relapse.align.api import run_align

    typer.echo(f"{cfg.method} ({cfg.writes}) -> {run_align(cfg)}")


def align_commands() -> typer.Typer:
    """``relapse align METHOD``, one command per registered method, whose flags are its config's fields."""
    from relapse.align import METHODS
    from relapse.cli_options import config_command
    from relapse.run_config import RunConfig
    from relapse.train.engine import TrainConfig

    methods = typer.Typer()
    for name in METHODS.names():
        method = METHODS.get(name)
        summary = method_summary(method)
        methods.command(name, help=summary + "\n\nWrites OUT/final: a safety LoRA (diffusers format), a full pipeline or a guard (SLD), "
                        "with its record.", short_help=re.split(r"(?<!al)\.\s", " ".join(summary.split()))[0])(
            config_command(method.config, print_aligned, summary, fixed={"method": name},
                           common=(TrainConfig, "Every training run") if issubclass(method.config, TrainConfig)
                           else (RunConfig, "Every run")))
    return methods


class AlignMethods(RegisteredCommands):
    make = staticmethod(align_commands)


align_app = typer.Typer(cls=AlignMethods, no_args_is_help=True, help=(
    "Align a model: erase a concept (esd, sdd, uce), make it forget under malicious fine-tuning (lt, ng), erase it against "
    "simulated fine-tuning (resist), or retrain the toy model without it (never-learned). `relapse align METHOD --help` "
    "lists the method's fields, each a flag."))
app.add_typer(align_app, name="align", cls=AlignMethods)


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
                                                           "and the defenses it attacks (repeatable; before: the rows before "
                                                           "any attack; default: all); give the part its own --out.")] = None,
    defenses: Annotated[Optional[list[str]], typer.Option("--defense", help="Run only this defense (repeatable; default: "
                                                          "all); give the part its own --out.")] = None,
) -> None:
    """Run a resilience study: align -> fine-tune -> generate -> evaluate, each step once, cached by its inputs."""
    from relapse.study.run import StudyRunConfig, run_study

    run_study(StudyRunConfig(config=config, out=out, resume=resume, dry_run=dry_run, workers=workers, executor=executor,
                             address=address, scenarios=scenarios or None, defenses=defenses or None))


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
    from typer._click.exceptions import ClickException, NoArgsIsHelpError

    show_warnings()
    try:
        code = app(standalone_mode=False)  # click's usage errors come back here, to be printed in one line
    except NoArgsIsHelpError as exc:
        exc.show()
        code = exc.exit_code
    except ClickException as exc:  # a flag of the wrong type or choice, an unknown flag or command
        print(f"error: {' '.join(exc.format_message().split())}", file=sys.stderr)
        code = 2
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = exc.exit_code
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
