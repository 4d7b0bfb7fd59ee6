"""RECE: UCE's edit, then rounds that erase the embeddings which still bring the concept back."""

import torch

import relapse
from relapse.align.rece import adversarial_embeddings, every_token
from relapse.align.uce import cross_attention_projections
from relapse.models.families import family_of

CONCEPT = dict(concept=["a checkered red star"])


def test_the_adversarial_embedding_is_what_the_edited_weights_need_to_give_the_original_output():
    gen = torch.Generator().manual_seed(0)
    original = {name: torch.randn(6, 8, generator=gen, dtype=torch.float64) for name in ("k", "v")}
    edited = {name: w + 0.3 * torch.randn(6, 8, generator=gen, dtype=torch.float64) for name, w in original.items()}
    c = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    found = adversarial_embeddings(c, edited, original, regular_scale=0.1)
    # the minimum of sum_l |W'_l a - W_l c|^2 + r |a|^2: its gradient vanishes there
    gradient = sum((found @ edited[n].T - c @ original[n].T) @ edited[n] for n in original) + 0.1 * found
    assert gradient.abs().max() < 1e-9
    assert torch.allclose(adversarial_embeddings(c, original, original, 1e-9), c, atol=1e-6)  # nothing edited: itself


def test_no_round_is_uce_and_a_round_erases_what_uces_edit_left(tiny_pipe):
    uce = relapse.erase(tiny_pipe, relapse.UCEConfig(**CONCEPT))
    assert all(torch.equal(uce.weights[n], w) for n, w in relapse.erase(tiny_pipe, relapse.RECEConfig(**CONCEPT, rounds=0)).weights.items())
    rece = relapse.erase(tiny_pipe, relapse.RECEConfig(**CONCEPT, rounds=1))
    assert rece.record["method"] == "rece" and rece.record["rounds"] == 1 and set(rece.weights) == set(uce.weights)
    family = family_of(tiny_pipe)
    original = {f"{n}.weight": layer.weight.detach().double() for n, layer in cross_attention_projections(family)}
    concept, guide = every_token(family, CONCEPT["concept"]), every_token(family, [""])
    left = adversarial_embeddings(concept, {n: w.double() for n, w in uce.weights.items()}, original, 0.1)

    def distance_to_guide(weights):  # where the embedding left is sent, against where UCE's weights send the guide
        return sum((left @ w.double().T - guide @ uce.weights[n].double().T).norm() for n, w in weights.items())

    assert distance_to_guide(rece.weights) < 0.5 * distance_to_guide(uce.weights)
