import json

import pytest

from relapse.errors import UserError
from relapse.review.labels import LabelStore
from relapse.review.sample import SAMPLE_FILE, SampleConfig, draw_sample, parse_filter, token_of


def test_the_default_sample_is_the_first_seed_before_and_at_each_scenarios_last_step(run):
    sample = draw_sample(run, SampleConfig(per_cell=10))
    assert [(c.labels["defense"], c.labels["scenario"], c.labels["step"], c.labels["seed"]) for c in sample.cells] == [
        ("none", "before", 0, 0), ("lt", "before", 0, 0), ("lt", "malicious", 200, 0)]
    assert len(sample.images) == 30 and all(len(c.images) == 10 for c in sample.cells)
    record = json.loads((run / "review" / SAMPLE_FILE).read_text())
    assert record["config"]["per_cell"] == 10 and len(record["items"]) == 30
    assert [item["token"] for item in record["items"]] == [token_of(i) for i in sample.images]


def test_the_blind_order_mixes_cells_and_a_token_names_no_cell(run):
    sample = draw_sample(run, SampleConfig(per_cell=10))
    folders = [image.rsplit("/", 1)[0] for image in sample.images]
    runs = sum(a != b for a, b in zip(folders, folders[1:]))
    assert runs > 10  # cell by cell would change folder twice
    assert all(len(t) == 12 and "generate" not in t for t in sample.tokens.values())


def test_the_draw_is_seeded_and_a_wider_choice_keeps_every_image_drawn(run):
    first = draw_sample(run, SampleConfig(per_cell=10, seed=3))
    assert draw_sample(run, SampleConfig(per_cell=10, seed=3)).images == first.images
    assert set(draw_sample(run, SampleConfig(per_cell=10, seed=4)).images) != set(first.images)
    wider = draw_sample(run, SampleConfig(per_cell=10, seed=3, cells=["seed=0", "seed=1,step=200"]))
    assert set(first.images) < set(wider.images) and len(wider.cells) == 5


def test_cell_filters(run):
    assert parse_filter("scenario=malicious, defense=lt|none") == {"scenario": {"malicious"}, "defense": {"lt", "none"}}
    sample = draw_sample(run, SampleConfig(per_cell=5, cells=["scenario=malicious,step=20"]))
    assert [c.labels["step"] for c in sample.cells] == [20]
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_filter("colour=red")
    with pytest.raises(UserError, match="no cell of the run matches"):
        draw_sample(run, SampleConfig(cells=["defense=esd"]))


def test_the_command_refuses_bad_input_in_one_line(run, tmp_path, run_cli):
    code, _, err = run_cli("review", tmp_path / "nowhere")
    assert code == 2 and "is not a folder" in err and "\n" not in err.strip()
    code, _, err = run_cli("review", run, "--cells", "colour=red")
    assert code == 2 and "KEY=VALUE" in err and "Traceback" not in err
    bad = tmp_path / "bad.csv"
    bad.write_text("token,label\nnot-a-token,concept\n")
    code, _, err = run_cli("review", run, "--import", bad, "--labeller", "ana")
    assert code == 2 and "bad.csv line 2" in err
    assert LabelStore(run / "review" / "labels.sqlite").current() == {}


def test_sheets_and_their_csv_round_trip_into_labels(run, tmp_path, run_cli):
    import csv

    from PIL import Image

    code, out, err = run_cli("review", run, "--per-cell", "4", "--sheets", tmp_path / "sheets", "--per-sheet", "5")
    assert code == 0, err
    sheets = sorted((tmp_path / "sheets").glob("sheet-*.png"))
    assert len(sheets) == 3 and Image.open(sheets[0]).size[0] > 5 * 32  # 12 images, 5 a sheet, drawn large
    rows = list(csv.DictReader(open(tmp_path / "sheets" / "labels.csv")))
    assert [r["number"] for r in rows] == [str(k) for k in range(1, 13)] and all(not r["label"] for r in rows)
    for r, label in zip(rows, ["concept", "trace", "", "none"]):
        r["label"] = label
    with open(tmp_path / "filled.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    code, out, err = run_cli("review", run, "--per-cell", "4", "--import", tmp_path / "filled.csv", "--labeller", "ana")
    assert code == 0 and "imported 3 labels" in out, err
    assert sorted(by["ana"] for by in LabelStore(run / "review" / "labels.sqlite").current().values()) == ["concept", "none", "trace"]
    code, out, _ = run_cli("review", run, "--per-cell", "4", "--export", tmp_path / "all.csv")
    exported = list(csv.DictReader(open(tmp_path / "all.csv")))
    assert code == 0 and len(exported) == 3 and {r["source"] for r in exported} == {"import:filled.csv"}
