import pytest

from relapse.data.prompts import read_prompts, shipped_prompt_sets
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
