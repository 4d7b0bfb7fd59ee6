import pytest

from relapse.data.prompts import read_prompts, select_prompts, shipped_prompt_sets
from relapse.errors import UserError


def test_text_file_skips_blanks_and_comments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# a comment\n\na red star\n  a blue circle  \n", encoding="utf-8")
    assert [p.text for p in read_prompts(f)] == ["a red star", "a blue circle"]


def test_jsonl_carries_per_prompt_seed_and_guidance(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a red star", "seed": 7, "guidance": 3.5, "category": "x"}\n', encoding="utf-8")
    (p,) = read_prompts(f)
    assert (p.text, p.seed, p.guidance, p.meta) == ("a red star", 7, 3.5, {"category": "x"})


I2P_CSV = """prompt,categories,hard,inappropriate_percentage,nudity_percentage,lexica_url,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height
"a figure, by an old master",sexual,1,80.0,72.5,https://lexica.art/x,2734,7.0,512,512
a lonely road at night,"violence,shocking",0,40.0,0.0,https://lexica.art/y,17,9.5,512,512
a bather in a lake,"sexual,hate",0,55.0,51.0,https://lexica.art/z,3,,512,512
"""


def test_i2p_csv_keeps_seed_guidance_and_filters_by_category_and_nudity(tmp_path):
    f = tmp_path / "i2p.csv"
    f.write_text(I2P_CSV, encoding="utf-8")
    prompts = read_prompts(f)
    assert [(p.text, p.seed, p.guidance) for p in prompts] == [
        ("a figure, by an old master", 2734, 7.0), ("a lonely road at night", 17, 9.5), ("a bather in a lake", 3, None)]
    assert prompts[0].meta == {"categories": "sexual", "hard": "1", "inappropriate_percentage": "80.0", "nudity_percentage": 72.5}
    assert [p.seed for p in select_prompts(prompts, categories=["sexual"])] == [2734, 3]
    assert [p.seed for p in select_prompts(prompts, categories=["shocking"])] == [17]
    assert [p.seed for p in select_prompts(prompts, min_nudity_percentage=50)] == [2734, 3]
    assert [p.seed for p in select_prompts(prompts, categories=["sexual"], min_nudity_percentage=60)] == [2734]


@pytest.mark.parametrize("content, message", [
    ("text,sd_seed\na star,1\n", "needs a 'prompt' column"),
    ("prompt,sd_seed\na star,seven\n", "i2p.csv:2: column sd_seed must be a number"),
    ("prompt,sd_seed\n", "holds no prompts"),
])
def test_bad_i2p_files(tmp_path, content, message):
    f = tmp_path / "i2p.csv"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        read_prompts(f)


def test_shipped_sets_resolve_by_name():
    assert {"clean", "target_direct", "target_indirect", "domain_shapes", "domain_sketch"} <= set(shipped_prompt_sets())
    assert len(read_prompts("toy:clean")) == 60


@pytest.mark.parametrize(
    "content, message",
    [(b"", "holds no prompts"), (b"# only a comment\n\n", "holds no prompts"), (b"caf\xe9 red star\n", "not UTF-8")],
)
def test_bad_prompt_files(tmp_path, content, message):
    f = tmp_path / "p.txt"
    f.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_prompts(f)


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="unknown toy prompt set"):
        read_prompts("toy:nope")
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(UserError, match="'prompt' field"):
        read_prompts(bad)
