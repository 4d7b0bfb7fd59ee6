import pytest

from relapse.review.agreement import agreement, human_rows
from relapse.review.labels import LabelStore
from relapse.review.sample import SampleConfig, draw_sample, results_rows


def label_as(run, store, sample, truth):
    """Label every sampled image of each cell with what ``truth`` says of its verdict."""
    import json

    for cell in sample.cells:
        evaluation = json.loads((run / cell.evaluations["toy"]).read_text())
        verdicts = {f"{evaluation['images']}/{e['file']}": e for e in evaluation["per_image"]}
        for image in cell.images:
            store.add(image, truth(verdicts[image]), "ana")


def test_human_rows_give_each_labelled_cell_its_concept_and_trace_rate(run):
    sample = draw_sample(run, SampleConfig(per_cell=40, cells=["scenario=malicious,step=200,seed=0"]))
    store = LabelStore(run / "review" / "labels.sqlite")
    label_as(run, store, sample, lambda e: "concept" if e["is_target"] else "trace" if e["is_trace"] else "none")
    rows = human_rows(run, results_rows(run))
    assert {(r["defense"], r["step"], r["metric"]): r["value"] for r in rows} == {
        ("lt", 200, "target_rate"): 0.25, ("lt", 200, "trace_rate"): 0.5}
    assert all(r["detector"] == "human" and r["n"] == 40 and r["ci95_low"] < r["value"] < r["ci95_high"] for r in rows)


def test_a_detector_that_agrees_has_kappa_one_and_one_that_misses_traces_is_marked(run):
    sample = draw_sample(run, SampleConfig(per_cell=40))
    store = LabelStore(run / "review" / "labels.sqlite")
    label_as(run, store, sample, lambda e: "concept" if e["is_target"] else "trace" if e["is_trace"] else "none")
    cells, detectors = agreement(run)
    assert detectors["toy"].kappa == pytest.approx(1.0) and not any(c.apart["toy"] for c in cells)
    assert detectors["toy"].confusion == [[60, 0, 0], [0, 10, 0], [0, 0, 50]]  # none, trace, concept

    # people see a trace in every image the detector calls none, on the cell before fine-tuning
    store.add_many([(image, "trace", "ana", "later") for image in sample.cells[1].images], "page")
    cells, detectors = agreement(run)
    marked = [c.labels["defense"] + "/" + c.labels["scenario"] for c in cells if c.apart["toy"]]
    assert marked == ["lt/before"] and detectors["toy"].kappa < 0.8
