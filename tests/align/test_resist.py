"""Resist on tiny random components: the simulated attacker trains only its own update and leaves the
weights as they were, a LoRA attack's update has its rank, an attack carries on across outer steps and
survives a checkpoint, the attacked term's gradient is exactly the gradient at the attacked weights (first
order), the weights are put back bit for bit, and the outer gradient is the weighted sum of its terms."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from relapse.align.api import run_align
from relapse.align.resist import Attack, Attacker, Resist, ResistConfig
from relapse.train.engine import draw
from relapse.train.module import ALIGN_RECORD

DATA = dict(harmful="toy:harmful:8", clean="toy:clean:8", benign="toy:patterns:8")


def resist(tmp_path, pipe, **kw):
    cfg = ResistConfig(concept=["checkered"], steps=2, batch_size=2, attack_batch=2, lr=1e-3, cache_dir=tmp_path / "cache", **DATA | kw)
    method = Resist(cfg)
    method.check()
    method.setup(pipe, 0)
    torch.manual_seed(0)
    method.trainable(pipe)
    return method


def simulate(method, attack: Attack, gen) -> dict[str, torch.Tensor]:
    attacker = Attacker(attack, method.attack_targets(attack.method), method.cfg.attack_rank, gen)
    for _ in range(attack.steps):
        attacker.step(method.family, method.noisy_batch(attack.data, gen, 2))
    return {n: d.detach() for n, d in attacker.delta().items()}


def unet_state(pipe):
    return {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_the_attacker_lowers_its_loss_and_leaves_the_weights_alone(tmp_path, tiny_pipe, kind):
    method = resist(tmp_path, tiny_pipe)
    before = unet_state(tiny_pipe)
    delta = simulate(method, Attack(kind, 1e-2, 5, "harmful"), draw(0, 0, 0, 0))
    assert all(torch.equal(p, before[n]) for n, p in tiny_pipe.unet.named_parameters())
    assert delta and all(d.abs().max() > 0 for d in delta.values())
    if kind == "lora":
        assert all(torch.linalg.matrix_rank(d) <= method.cfg.attack_rank for d in delta.values())
        assert all(any(p in n for p in ("to_q", "to_k", "to_v", "to_out")) for n in delta)
    batch = method.noisy_batch("harmful", draw(1, 0, 0, 0), 8)
    plain = F.mse_loss(tiny_pipe.unet(batch.x_t, batch.t, batch.cond["prompt_embeds"]).sample, batch.target)
    attacked = copy.deepcopy(tiny_pipe.unet)
    with torch.no_grad():
        for n, p in attacked.named_parameters():
            p.add_(delta.get(n, 0))
    assert F.mse_loss(attacked(batch.x_t, batch.t, batch.cond["prompt_embeds"]).sample, batch.target) < plain


def test_an_attack_carries_on_across_outer_steps_until_it_has_taken_its_steps(tmp_path, tiny_pipe):
    method = resist(tmp_path, tiny_pipe, attack_steps=[5], inner_steps=2)
    depths, attackers = [], []
    for step in range(4):
        depths.append(method.loss(tiny_pipe.unet, step, 0, 0)[1]["attack_depth"])
        attackers.append(method.attacker)
    assert depths == [2, 4, 5, 2]
    assert attackers[0] is attackers[1] is attackers[2] and attackers[3] is not attackers[2]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_an_attacker_restored_from_its_state_goes_on_as_the_original(tmp_path, tiny_pipe, kind):
    method = resist(tmp_path, tiny_pipe)
    gen = draw(0, 0, 0, 0)
    original = Attacker(Attack(kind, 1e-2, 9, "benign"), method.attack_targets(kind), 4, gen)
    for _ in range(2):
        original.step(method.family, method.noisy_batch("benign", gen, 2))
    restored = Attacker.from_state(original.state_dict(), method.attack_targets, 4)
    assert restored.attack == original.attack and restored.taken == 2
    batch = method.noisy_batch("benign", gen, 2)
    for attacker in (original, restored):
        attacker.step(method.family, batch)
    for (n, want), got in zip(original.delta().items(), restored.delta().values()):
        assert torch.equal(got, want), n


@pytest.mark.parametrize("as_", ["lora", "full"])
def test_the_attacked_gradient_is_the_gradient_at_the_attacked_weights(tmp_path, tiny_pipe, as_):
    method = resist(tmp_path, tiny_pipe, **{"as": as_})
    gen = draw(0, 0, 0, 0)
    batch = method.noisy_batch("harmful", gen, 2)
    target = method.erase_target(batch)
    delta = simulate(method, Attack("full", 1e-2, 2, "harmful"), gen)
    before = unet_state(tiny_pipe)
    value, grads = method.attacked_gradient(delta, batch, target)
    assert all(torch.equal(p, before[n]) for n, p in tiny_pipe.unet.named_parameters()), "weights put back bit for bit"
    moved = copy.deepcopy(tiny_pipe.unet)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.add_(delta.get(n, 0))
    expected_value = F.mse_loss(moved(batch.x_t, batch.t, batch.cond["prompt_embeds"]).sample, target)
    names = [n for n, p in tiny_pipe.unet.named_parameters() if p.requires_grad]
    params = dict(moved.named_parameters())
    expected = torch.autograd.grad(expected_value, [params[n] for n in names])
    assert value.item() == pytest.approx(expected_value.item(), rel=1e-6)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)
    assert any(g.abs().max() > 0 for g in grads)


def test_the_outer_gradient_adds_beta_times_the_attacked_gradient(tmp_path, tiny_pipe):
    """The same step (same draws) at beta = 0, 1, 2: the gradient moves by the attacked gradient per unit of beta."""
    method = resist(tmp_path, tiny_pipe)

    def gradient(beta):
        method.cfg = method.cfg.model_copy(update={"resist_weight": beta})
        method.attacker = None  # each call draws the same fresh attack
        loss, logged = method.loss(tiny_pipe.unet, 0, 0, 0)
        grads = torch.autograd.grad(loss, method.params)
        return torch.cat([g.flatten() for g in grads]), logged

    (g0, logged), (g1, _), (g2, _) = gradient(0.0), gradient(1.0), gradient(2.0)
    assert set(logged) == {"erase", "keep", "attacked", "total", "attack_depth"} and logged["erase"] > 0 and logged["attacked"] > 0
    assert (g1 - g0).abs().max() > 1e-8
    torch.testing.assert_close(g2 - g1, g1 - g0, atol=1e-6, rtol=1e-4)


def test_resist_writes_a_safety_lora_with_every_term_in_its_record(tmp_path, tiny_model_dir):
    cfg = ResistConfig(model=str(tiny_model_dir), concept=["checkered"], out=tmp_path / "resist", steps=2, batch_size=2,
                       attack_batch=2, attack_steps=[2], cache_dir=tmp_path / "cache", **DATA)
    final = run_align(cfg)
    record = json.loads((final / ALIGN_RECORD).read_text())
    assert record["method"] == "resist" and len(record["history"]) == 2
    assert set(record["history"][0]) == {"erase", "keep", "attacked", "total", "attack_depth"} and record["benign_data"]["n"] == 8
    assert (final / "pytorch_lora_weights.safetensors").is_file()


def test_two_cpu_processes_each_carry_their_own_attack_through_a_checkpoint(tmp_path, tiny_model_dir):
    """torchrun with 2 processes, full weights: the attacked term's gradient joins DDP's all-reduce, and each
    process checkpoints its own attack in progress."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    env = os.environ | {"RELAPSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "relapse.cli", "align", "resist",
           "--model", str(tiny_model_dir), "--concept", "checkered", "--harmful", DATA["harmful"], "--clean", DATA["clean"],
           "--as", "full", "--steps", "3", "--batch-size", "2", "--attack-steps", "5", "--inner-steps", "1",
           "--checkpoint-every", "2", "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "ddp" / "final" / ALIGN_RECORD).read_text())
    assert record["processes"] == 2 and [h["attack_depth"] for h in record["history"]] == [1, 2, 3]
    states = [load_file(p) for p in sorted((tmp_path / "ddp" / "checkpoints" / "step-000002").glob("method-*.safetensors"))]
    assert len(states) == 2 and all(s["attacker.taken"].item() == 2 for s in states)
    leaves = [{k: v for k, v in s.items() if k.startswith("attacker.leaf")} for s in states]
    assert leaves[0].keys() != leaves[1].keys() or not all(torch.equal(v, leaves[1][k]) for k, v in leaves[0].items()), \
        "the two processes drew the same attack"
