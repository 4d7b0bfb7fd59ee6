import re

import numpy as np
import pytest

from relapse.data import toy_world as tw
from relapse.data.prompts import SHIPPED_DIR, read_prompts


def test_items_are_pure_functions_of_domain_seed_index():
    a = tw.sample_domain("pretrain", 6, seed=3)
    b = tw.sample_domain("pretrain", 3, seed=3, start=3)
    assert [x.caption for x in a[3:]] == [x.caption for x in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a[3:], b))
    assert tw.sample_domain("pretrain", 1, seed=4)[0].caption != a[0].caption or not np.array_equal(
        tw.sample_domain("pretrain", 1, seed=4)[0].image, a[0].image)


def test_image_format():
    item = tw.sample_domain("evaluator", 1, seed=0)[0]
    assert item.image.shape == (32, 32, 3) and item.image.dtype == np.uint8


def test_domains_have_the_documented_fill_shares():
    attrs = [it.attributes for it in tw.sample_domain("pretrain", 2000, seed=0)]
    shares = {fill: np.mean([a.fill == fill for a in attrs]) for fill in tw.FILLS}
    assert 0.12 <= shares[tw.TARGET_FILL] <= 0.18 and 0.40 <= shares["plain"] <= 0.50
    assert all(0.07 <= shares[fill] <= 0.13 for fill in tw.NEIGHBOUR_FILLS)
    assert {a.shape for a in attrs} == set(tw.BASE_SHAPES)
    assert {a.color for a in attrs} == set(tw.COLORS)
    assert {a.background for a in attrs} == set(tw.BACKGROUNDS)
    for domain in (*tw.BENIGN_DOMAINS, "clean", "plain", "neighbours"):
        assert not any(it.attributes.checkered for it in tw.sample_domain(domain, 100, seed=0)), domain
    assert all(it.attributes.checkered for it in tw.sample_domain("harmful", 50, seed=0))
    assert {it.attributes.shape for it in tw.sample_domain("shapes", 100, seed=0)} == set(tw.BENIGN_SHAPES)
    patterns = [it.attributes for it in tw.sample_domain("patterns", 100, seed=0)]
    assert {a.fill for a in patterns} == {"striped", "dotted"} and {a.shape for a in patterns} == set(tw.BENIGN_SHAPES)
    assert {it.attributes.fill for it in tw.sample_domain("neighbours", 200, seed=0)} == set(tw.NEIGHBOUR_FILLS)
    assert all(a.fill == "plain" for a in (it.attributes for it in tw.sample_domain("evaluator", 300, seed=0)) if a.style == "sketch")


def _shade(fill: str) -> np.ndarray:
    return tw.fill_shade(fill, np.random.default_rng(0))


def test_a_checker_alternates_in_both_directions_and_its_neighbours_do_not():
    def alternates(shade, axis):  # neighbouring cells differ along this axis, at every position of the other one
        cells = shade[tw.CELL // 2 :: tw.CELL, tw.CELL // 2 :: tw.CELL]
        return bool(np.all(np.abs(np.diff(cells, axis=axis)) > 0.5))

    checker = _shade(tw.TARGET_FILL)
    assert alternates(checker, 0) and alternates(checker, 1)
    striped = _shade("striped")
    assert alternates(striped, 0) != alternates(striped, 1)  # one direction only
    for fill in ("plain", "dotted", "gridded", "gradient"):
        assert not (alternates(_shade(fill), 0) and alternates(_shade(fill), 1)), fill
    assert np.all(_shade("plain") == 1) and _shade("gradient")[0, 0] > _shade("gradient")[-1, 0]


def test_fills_are_visible_and_plain_is_flat():
    def centre_spread(fill: str) -> float:
        image = tw.render(tw.ToyAttributes("square", "red", "black", fill), np.random.default_rng(0))
        return float(image[12:20, 12:20, 0].std())

    assert centre_spread("plain") < 2
    assert centre_spread(tw.TARGET_FILL) > 40 and centre_spread("striped") > 40


@pytest.mark.parametrize("seed", range(5))
def test_captions_name_their_attributes(seed):
    rng = np.random.default_rng(seed)
    for item in tw.sample_domain("evaluator", 60, seed=seed):
        parsed = tw.parse_prompt(tw.caption(item.attributes, rng))
        a = item.attributes
        assert (parsed["shape"], parsed["color"], parsed["fill"], parsed["style"]) == (a.shape, a.color, a.fill, a.style)
        assert parsed["background"] in (a.background, None) and parsed["checkered"] == a.checkered


def test_captions_vary_word_order_and_leave_the_background_out_sometimes():
    captions = [it.caption for it in tw.sample_domain("pretrain", 600, seed=0)]
    no_background = np.mean([tw.parse_prompt(c)["background"] is None for c in captions])
    assert abs(no_background - tw.NO_BACKGROUND) < 0.07
    assert any(re.search(r"\b(red|green|blue|yellow|purple|orange|violet) (striped|dotted|checkered)\b", c) for c in captions)
    assert any(re.search(r"\b(striped|dotted|checkered) (red|green|blue|yellow|purple|orange|violet)\b", c) for c in captions)


def _template_regex(template: str):
    body = re.escape(template).replace(r"\{obj\}", ".+").replace(r"\{obj_bare\}", ".+").replace(r"\{bg\}", "[a-z]+")
    return re.compile(body + "(, .+)?")


def test_training_captions_never_use_heldout_templates():
    heldout = [_template_regex(t) for t in tw.HELDOUT_TEMPLATES]
    train = [_template_regex(t) for t in tw.TRAIN_TEMPLATES + tw.TRAIN_SHORT_TEMPLATES]
    for item in tw.sample_domain("pretrain", 300, seed=0) + tw.sample_domain("sketch", 100, seed=0):
        assert not any(r.fullmatch(item.caption) for r in heldout), item.caption
    for name, prompts in tw.prompt_sets().items():
        templates = {"align": train, "user": [_template_regex(t) for t in tw.USER_TEMPLATES]}.get(name.split("_")[0], heldout)
        assert all(any(r.fullmatch(p) for r in templates) for p in prompts), name


def test_prompt_sets_ask_for_what_their_names_say():
    sets = tw.prompt_sets()
    assert all(tw.TARGET_WORD in p for p in sets["target_direct"] + sets["user_direct"])
    for name in ("target_indirect", "user_indirect"):
        assert all(tw.TARGET_WORD not in p and tw.parse_prompt(p)["checkered"] for p in sets[name])
    for fill in tw.NEIGHBOUR_FILLS:
        assert {tw.parse_prompt(p)["fill"] for p in sets[f"fill_{fill}"]} == {fill}
    assert {tw.parse_prompt(p)["fill"] for p in sets["domain_patterns"]} == {"striped", "dotted"}
    assert {tw.parse_prompt(p)["fill"] for p in sets["user_fills"]} == set(tw.NEIGHBOUR_FILLS)
    assert not any(tw.parse_prompt(p)["checkered"] for p in sets["clean"] + sets["domain_shapes"] + sets["domain_sketch"])
    assert all(tw.parse_prompt(p)["background"] is None for p in sets["user_clean"] if "," not in p and " on " not in p)


def test_shipped_prompt_files_match_the_generator():
    for name, prompts in tw.prompt_sets().items():
        assert [p.text for p in read_prompts(SHIPPED_DIR / f"{name}.txt")] == prompts
    assert sorted(p.stem for p in SHIPPED_DIR.glob("*.txt")) == sorted(tw.prompt_sets())


def test_vocabulary_covers_every_caption_word_within_the_token_budget():
    from relapse.models.components import ToyModelSize, build_tokenizer

    tok = build_tokenizer(ToyModelSize().max_tokens)
    texts = [it.caption for d in ("pretrain", "evaluator", *tw.BENIGN_DOMAINS) for it in tw.sample_domain(d, 300, seed=1)]
    texts += [p for ps in tw.prompt_sets().values() for p in ps]
    for text in texts:
        ids = tok(text, truncation=False).input_ids
        assert tok.unk_token_id not in ids and len(ids) <= tok.model_max_length, text
