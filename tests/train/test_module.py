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
