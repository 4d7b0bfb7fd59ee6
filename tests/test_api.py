"""The public API (`import relapse`): light to import, in memory, and the same results as the CLI's folders."""

import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

import relapse
from relapse.measure.evaluate import EvaluateRunConfig, run_evaluate
from relapse.sampling import GenerateConfig, read_manifest, run_generate

README = Path(__file__).parents[1] / "README.md"
PROMPTS = ["a checkered red star", "a blue circle"]


def test_import_relapse_is_light():
    code = ("import sys, relapse; print(any(m in sys.modules for m in ('torch', 'diffusers', 'transformers'))); "
            "relapse.progress.set_enabled(False); print(relapse.progress._enabled)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]  # nothing heavy at import; the bars' switch is at hand
    assert set(relapse.__all__) <= set(dir(relapse))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        relapse.nothing  # noqa: B018


def test_no_subpackage_shadows_an_exported_name():
    """Importing ``relapse.X`` sets the attribute ``X`` on the package: a subpackage named like an exported function
    would replace it (``relapse.audit`` became a module once ``relapse.audit.audit`` had been imported)."""
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(relapse.__path__, "relapse."):
        importlib.import_module(module.name)
    shadowed = [name for name in relapse.__all__ if name != "progress" and isinstance(getattr(relapse, name), ModuleType)]
    assert shadowed == []


def test_every_registered_method_has_its_config_in_the_api():
    from relapse.align import METHODS as ALIGN
    from relapse.finetuning import METHODS as FINETUNE

    for method in (*ALIGN, *FINETUNE):
        assert getattr(relapse, method.config.__name__) is method.config


def test_in_memory_generation_and_evaluation_equal_the_cli_folders(tiny_model_dir, tiny_evaluator_dir, tmp_path):
    pipe = relapse.load(tiny_model_dir)
    made = relapse.generate(pipe, relapse.SamplerConfig(images_per_prompt=2, steps=2, seed=3), prompts=PROMPTS)
    assert [(r["prompt"], r["seed"]) for r in made.rows] == [(p, s) for p in PROMPTS for s in (3, 4)]
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    folder = run_generate(GenerateConfig(model=str(tiny_model_dir), prompts=str(tmp_path / "prompts.txt"), out=tmp_path / "cli",
                                         images_per_prompt=2, steps=2, seed=3))
    on_disk = read_manifest(folder)
    assert [r["seed"] for r in on_disk] == [r["seed"] for r in made.rows]
    for image, row in zip(made.images, on_disk):  # the same pixels
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(folder / row["file"]).convert("RGB")))
    rebatched = relapse.generate(pipe, relapse.SamplerConfig(images_per_prompt=2, steps=2, seed=3, batch_size=3), prompts=PROMPTS)
    assert max(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()  # batching reorders float sums: 1 level
               for a, b in zip(made.images, rebatched.images)) <= 1
    options = {"weights": str(tiny_evaluator_dir)}
    in_memory = relapse.evaluate(made, relapse.EvaluateConfig(detector="toy", detector_options=options))
    from_folder = run_evaluate(EvaluateRunConfig(images=folder, detector="toy", detector_options=options))
    assert in_memory.target_rate.model_dump() == from_folder["target_rate"]  # the same figures, in memory and on disk
    assert in_memory.to_json()["target_rate"] == from_folder["target_rate"] and in_memory.target_rate.n == len(made.images)
    assert in_memory.target_rate.interval == tuple(from_folder["target_rate"]["ci95"])
    assert [e["is_target"] for e in in_memory.per_image] == [e["is_target"] for e in from_folder["per_image"]]
    as_array = relapse.evaluate(np.stack([np.asarray(i.convert("RGB")) for i in made.images]),
                                relapse.EvaluateConfig(detector_options=options), prompts=made.prompts)
    assert as_array.target_rate == in_memory.target_rate
    saved = made.save(tmp_path / "saved")
    assert [r["file"] for r in read_manifest(saved)] == [r["file"] for r in on_disk]


def test_evaluate_wants_one_prompt_per_image(tiny_evaluator_dir):
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(relapse.UserError, match="one prompt per image"):
        relapse.evaluate(images, relapse.EvaluateConfig(detector_options={"weights": str(tiny_evaluator_dir)}), prompts=["a red star"])


def test_the_readme_python_example_runs_on_the_toy_model(tmp_path, monkeypatch, capsys):
    block = re.search(r"## Python API.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    concept, trace, distance = map(float, printed.strip().splitlines()[-1].split())
    assert concept >= 0.9 and trace == 1.0 and distance > 0  # the unaligned toy model draws the concept on every direct prompt
    assert len(read_manifest(tmp_path / "runs" / "direct")) == 30


def test_the_readme_erase_finetune_evaluate_script_runs_on_the_toy_model(tmp_path, monkeypatch, capsys):
    block = re.search(r"```python\n(import relapse\n\npipe = relapse.load\(\"toy\"\)  # W0.*?)```", README.read_text(), re.S).group(1)
    assert len(block.strip().splitlines()) <= 15
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    rates = {name: re.findall(r"(\d+)%", text) for name, text in (line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())}
    assert int(rates["base"][0]) >= 90 and rates["base"][1] == "100"  # the base draws the concept, at least a trace on every image
    assert rates["aligned"] == ["0", "0"]  # ESD-u erased the fill, traces too
    reread = relapse.TrainedModule.load(tmp_path / "runs" / "esd-u")
    assert reread.kind == "lora" and all(torch.equal(reread.weights[k], scope["safety"].weights[k]) for k in reread.weights)
    assert scope["benign"].record["composes_with"][0]["align_record"]["method"] == "esd"


def test_in_memory_training_gives_the_weights_of_the_cli_runs(tiny_model_dir, tmp_path):
    from relapse.align.api import run_align
    from relapse.finetuning.base import run_finetune

    esd = relapse.ESDConfig(concept=PROMPTS[:1], steps=2, batch_size=2, sample_steps=2, lr=1e-2, params="noxattn")
    pipe = relapse.load(tiny_model_dir)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    safety = relapse.erase(pipe, esd)
    on_disk = relapse.TrainedModule.load(run_align(esd.model_copy(update={"model": str(tiny_model_dir), "out": tmp_path / "esd"})))
    assert safety.weights.keys() == on_disk.weights.keys()
    assert all(torch.equal(safety.weights[k], on_disk.weights[k]) for k in safety.weights)
    ft = relapse.FinetuneConfig(method="modular", steps=2, batch_size=2, lr=1e-3, cache_dir=tmp_path / "cache")
    benign = relapse.finetune(pipe, ft, data="toy:shapes:8", safety=[safety])
    cli = relapse.TrainedModule.load(run_finetune(ft.model_copy(update={
        "model": str(tiny_model_dir), "data": "toy:shapes:8", "loras": [tmp_path / "esd"], "out": tmp_path / "ft"})))
    assert all(torch.equal(benign.weights[k], cli.weights[k]) for k in benign.weights)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())  # the pipeline was left as it was


def test_harden_takes_arrays_in_memory_and_returns_full_weights(tiny_model_dir, tmp_path):
    from relapse.data.datasets import load_dataset

    clean, harmful = load_dataset("toy:clean:6"), load_dataset("toy:harmful:6", 1)
    pipe = relapse.load(tiny_model_dir)
    lt = relapse.harden(pipe, relapse.LTConfig(steps=2, batch_size=2, lr=1e-3, cache_dir=tmp_path),
                        clean=(clean.images, clean.captions), harmful=(harmful.images, harmful.captions))
    assert lt.kind == "full" and lt.record["clean_data"]["source"] == "in-memory" and len(lt.record["history"]) == 2
    lt.save(tmp_path / "lt")
    reread = relapse.TrainedModule.load(tmp_path / "lt")
    reread.apply(pipe)
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in lt.weights.items())
    with pytest.raises(TypeError, match="relapse.harden takes one of LTConfig, NGConfig"):
        relapse.harden(pipe, relapse.ESDConfig(concept=["x"]), clean="toy:clean:4", harmful="toy:harmful:4")


def test_every_call_leaves_the_callers_pipeline_as_it_found_it_safety_modules_included(tiny_pipe, tmp_path):
    """A fine-tune on an aligned model fuses the safety module for its run and takes it out again, so a Modular
    fine-tune on the same pipeline next is not refused as made for another base."""
    before = {n: p.clone() for n, p in tiny_pipe.unet.named_parameters()}
    safety = relapse.erase(tiny_pipe, relapse.ESDConfig(concept=["checkered"], steps=1, batch_size=1, sample_steps=2, lr=1e-2))
    for method in ("lora", "full", "modular"):
        relapse.finetune(tiny_pipe, relapse.FinetuneConfig(method=method, steps=1, batch_size=2, cache_dir=tmp_path),
                         data="toy:shapes:4", safety=[safety])
        assert all(torch.equal(p, before[n]) for n, p in tiny_pipe.unet.named_parameters()), method
