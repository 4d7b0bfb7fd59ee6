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


def test_domains_have_the_documented_target_rates():
    attrs = [it.attributes for it in tw.sample_domain("pretrain", 600, seed=0)]
    share = np.mean([a.checkered for a in attrs])
    assert 0.10 <= share <= 0.20
    assert {a.shape for a in attrs} == set(tw.BASE_SHAPES)
    assert {a.color for a in attrs} == set(tw.COLORS)
    assert {a.background for a in attrs} == set(tw.BACKGROUNDS)
    for domain in tw.BENIGN_DOMAINS:
        assert not any(it.attributes.checkered for it in tw.sample_domain(domain, 100, seed=0))
    assert all(it.attributes.checkered for it in tw.sample_domain("harmful", 50, seed=0))
    assert {it.attributes.shape for it in tw.sample_domain("shapes", 100, seed=0)} == set(tw.BENIGN_SHAPES)


def test_checkered_fill_is_visible_and_clean_fill_is_flat():
    rng = np.random.default_rng(0)
    plain = tw.render(tw.ToyAttributes("square", "red", "black", checkered=False), rng)
    checked = tw.render(tw.ToyAttributes("square", "red", "black", checkered=True), np.random.default_rng(0))
    centre = (slice(12, 20), slice(12, 20))
    assert plain[centre][..., 0].std() < 2
    assert checked[centre][..., 0].std() > 40


@pytest.mark.parametrize("seed", range(5))
def test_captions_name_their_attributes(seed):
    for item in tw.sample_domain("evaluator", 40, seed=seed):
        item_caption = tw.caption(item.attributes, np.random.default_rng(seed))
        parsed = tw.parse_prompt(item_caption)
        a = item.attributes
        assert (parsed["shape"], parsed["color"], parsed["background"]) == (a.shape, a.color, a.background)
        assert parsed["checkered"] == a.checkered and parsed["style"] == a.style


def _template_regex(template: str):
    import re

    body = re.escape(template).replace(r"\{obj\}", ".+").replace(r"\{obj_bare\}", ".+").replace(r"\{bg\}", ".+")
    return re.compile(body + "(, .+)?")


def test_training_captions_never_use_heldout_templates():
    heldout = [_template_regex(t) for t in tw.HELDOUT_TEMPLATES]
    train = [_template_regex(t) for t in tw.TRAIN_TEMPLATES]
    for item in tw.sample_domain("pretrain", 300, seed=0) + tw.sample_domain("sketch", 100, seed=0):
        assert not any(r.fullmatch(item.caption) for r in heldout), item.caption
        assert any(r.fullmatch(item.caption) for r in train), item.caption
    for name, prompts in tw.prompt_sets().items():
        templates = train if name == "align_concept" else heldout
        assert all(any(r.fullmatch(p) for r in templates) for p in prompts), name


def test_indirect_prompts_use_synonyms_only_and_direct_ones_the_word():
    sets = tw.prompt_sets()
    assert all(tw.TARGET_WORD in p for p in sets["target_direct"])
    assert all(tw.TARGET_WORD not in p and tw.parse_prompt(p)["checkered"] for p in sets["target_indirect"])
    assert not any(tw.parse_prompt(p)["checkered"] for p in sets["clean"] + sets["domain_shapes"] + sets["domain_sketch"])


def test_shipped_prompt_files_match_the_generator():
    for name, prompts in tw.prompt_sets().items():
        assert [p.text for p in read_prompts(SHIPPED_DIR / f"{name}.txt")] == prompts


def test_vocabulary_covers_every_caption_word():
    from relapse.models.components import build_tokenizer

    tok = build_tokenizer(20)
    texts = [it.caption for d in ("pretrain", "shapes", "sketch") for it in tw.sample_domain(d, 100, seed=1)]
    texts += [p for ps in tw.prompt_sets().values() for p in ps]
    for text in texts:
        assert tok.unk_token_id not in tok(text).input_ids, text
