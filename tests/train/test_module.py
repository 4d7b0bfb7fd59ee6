"""A trained module in memory is the same model as its files: applied from memory, or loaded by plain
diffusers from what ``save`` wrote; a run folder stands for its ``final/``."""

import torch

from relapse.align import METHODS
from relapse.align.esd import ESDConfig
from relapse.models.components import ToyModelSize, build_pipeline
from relapse.models.lora import LoraSpec, merge_loras
from relapse.train.engine import train
from relapse.train.module import TrainedModule


def test_a_lora_applied_from_memory_equals_the_saved_one_loaded_by_diffusers(tmp_path, tiny_pipe):
    cfg = ESDConfig(concept=["a checkered red star"], steps=2, batch_size=2, sample_steps=2, lr=1e-2, params="noxattn")
    module = train(tiny_pipe, METHODS.get("esd")(cfg))
    module.save(tmp_path / "run" / "final")
    in_memory, plain, ours = (build_pipeline(ToyModelSize.tiny(), seed=0) for _ in range(3))
    module.apply(in_memory)
    plain.load_lora_weights(tmp_path / "run" / "final")
    plain.fuse_lora()
    plain.unload_lora_weights()
    merge_loras(ours, [LoraSpec(tmp_path / "run")])  # the run folder reads its final/
    for name, weight in in_memory.unet.state_dict().items():
        assert torch.equal(weight, ours.unet.state_dict()[name]) and torch.allclose(weight, plain.unet.state_dict()[name], atol=1e-6)
    assert TrainedModule.load(tmp_path / "run").record["method"] == "esd"


def test_a_lora_with_its_own_alpha_applies_from_memory_as_its_file_does(tmp_path):
    """A third-party LoRA may train with lora_alpha != rank; in memory no LoraConfig reaches diffusers, so the
    module bakes alpha / rank into lora_B (alpha 4 at rank 2 here, and 1 on one module by alpha_pattern)."""
    from peft import LoraConfig

    from relapse.models.lora import save_adapter_lora

    source = build_pipeline(ToyModelSize.tiny(), seed=0)
    torch.manual_seed(1)
    source.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, alpha_pattern={"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 1},
                                       target_modules=["to_q", "to_v"], init_lora_weights=False))
    save_adapter_lora(source.unet, tmp_path / "lora")
    from_file, from_memory, base = (build_pipeline(ToyModelSize.tiny(), seed=0) for _ in range(3))
    merge_loras(from_file, [LoraSpec(tmp_path / "lora")])
    TrainedModule.load(tmp_path / "lora").apply(from_memory)
    changed = 0
    for name, weight in from_file.unet.state_dict().items():
        assert torch.allclose(weight, from_memory.unet.state_dict()[name], atol=1e-6), name
        changed += not torch.equal(weight, base.unet.state_dict()[name])
    assert changed > 0
