"""Commands made from config classes: every plain field a flag, with its default in the help, and nothing else."""

from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from relapse.align import METHODS
from relapse.cli_options import config_command, flag_name, options, plain_type


class Inner(BaseModel):
    steps: int = 3


class Example(BaseModel):
    lr: float = Field(1e-3, description="learning rate")
    as_: Literal["lora", "full"] = Field("lora", alias="as", description="what it writes")
    loras: list[Path] = Field(default_factory=list, json_schema_extra={"flag": "lora"}, description="LoRAs")
    sampler: Inner = Field(default_factory=Inner, description="nested: YAML only")
    prompts: str = Field(description="required")


def test_plain_fields_become_flags_named_after_them_and_nested_ones_stay_in_yaml():
    assert [flag_name(n, i) for n, i in Example.model_fields.items()] == ["--lr", "--as", "--lora", "--sampler", "--prompts"]
    assert [p.name for p in options(Example)] == ["lr", "as_", "loras", "prompts"]
    assert plain_type(Example.model_fields["sampler"].annotation) is None
    assert plain_type(list[Literal["a", "b"]]) == list[str]  # typer repeats plain types; the config checks the choice


def test_a_command_builds_its_config_from_the_file_then_the_flags(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    seen = []
    app = typer.Typer()
    app.command("go")(config_command(Example, seen.append, "doc"))
    app.command("other")(lambda: None)
    (tmp_path / "c.yaml").write_text("lr: 0.5\nprompts: p.txt\nsampler: {steps: 9}\n")
    result = CliRunner().invoke(app, ["go", "--config", str(tmp_path / "c.yaml"), "--as", "full", "--lora", "a", "--lora", "b"])
    assert result.exit_code == 0, result.output
    assert seen == [Example(lr=0.5, prompts="p.txt", sampler=Inner(steps=9), loras=[Path("a"), Path("b")], **{"as": "full"})]
    helped = CliRunner().invoke(app, ["go", "--help"], env={"COLUMNS": "200"}).output
    assert "learning rate. [default: (0.001)]" in helped and "[default: (required)]" in helped and "--sampler" not in helped


@pytest.mark.parametrize("method", METHODS.names())
def test_align_method_help_lists_every_plain_field_of_its_config_with_its_default(method, run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    code, out, _ = run_cli("align", method, "--help")
    assert code == 0
    config = METHODS.get(method).config
    for name, info in config.model_fields.items():
        if name != "method" and plain_type(info.annotation) is not None:
            assert flag_name(name, info) in out, (method, name)
    assert "--method" not in out  # the command names it


def test_align_lists_every_registered_method(run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    code, out, _ = run_cli("align", "--help")
    assert code == 0 and all(f" {name} " in out for name in METHODS.names())


def test_every_flag_of_every_command_says_what_it_is():
    from relapse.attack.prompts import AttackPromptsConfig
    from relapse.finetuning.base import FinetuneConfig
    from relapse.measure.evaluate import EvaluateRunConfig
    from relapse.sampling import GenerateConfig
    from relapse.verdict.audit import AuditRunConfig

    configs = [METHODS.get(n).config for n in METHODS.names()] + [FinetuneConfig, GenerateConfig, EvaluateRunConfig,
                                                                   AuditRunConfig, AttackPromptsConfig]
    silent = [f"{c.__name__}.{n}" for c in configs for n, i in c.model_fields.items()
              if n != "method" and plain_type(i.annotation) is not None and not i.description]
    assert not silent


def test_a_boolean_field_switches_both_ways(tmp_path):
    import typer
    from typer.testing import CliRunner

    class Switch(BaseModel):
        on: bool = Field(True, description="on by default")

    seen = []
    app = typer.Typer()
    app.command("go")(config_command(Switch, seen.append, "doc"))
    app.command("other")(lambda: None)
    for args, expected in (([], True), (["--no-on"], False), (["--on"], True)):
        assert CliRunner().invoke(app, ["go", *args]).exit_code == 0
        assert seen.pop().on is expected
