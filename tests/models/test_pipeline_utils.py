"""The weights' fingerprint: one per base at each precision it may be loaded in."""

from __future__ import annotations

import torch

from relapse.models.pipeline_utils import weights_fingerprint, weights_fingerprints


def test_a_base_is_known_at_every_precision_it_loads_in():
    torch.manual_seed(0)
    fp32 = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Conv2d(3, 4, 3))
    exact, at_bf16, at_fp16 = weights_fingerprints(fp32)
    half = {dtype: torch.nn.Sequential(*(torch.nn.Module.to(m, dtype) for m in
                                         (torch.nn.Linear(8, 8), torch.nn.Conv2d(3, 4, 3)))) for dtype in (torch.bfloat16, torch.float16)}
    for dtype, module in half.items():
        module.load_state_dict({k: v.to(dtype) for k, v in fp32.state_dict().items()})
    assert weights_fingerprints(half[torch.bfloat16]) == [at_bf16] and weights_fingerprints(half[torch.float16]) == [at_fp16]
    upcast = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Conv2d(3, 4, 3))
    upcast.load_state_dict({k: v.float() for k, v in half[torch.bfloat16].state_dict().items()})
    assert at_bf16 in weights_fingerprints(upcast)  # a bf16 checkpoint loaded in fp32 rounds back to itself
    assert len({exact, at_bf16, at_fp16, weights_fingerprint(upcast)}) == 4


def test_one_changed_value_or_name_changes_the_fingerprint():
    torch.manual_seed(0)
    module = torch.nn.Linear(8, 8)
    before = weights_fingerprint(module)
    with torch.no_grad():
        module.weight[3, 5] += 1e-6
    assert weights_fingerprint(module) != before
    renamed = torch.nn.Sequential(module)
    assert weights_fingerprint(renamed) != weights_fingerprint(module)
