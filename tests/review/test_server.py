import pytest
from fastapi.testclient import TestClient

from relapse.review.labels import LabelStore
from relapse.review.sample import SampleConfig, draw_sample
from relapse.review.server import create_app


@pytest.fixture
def client(run):
    sample = draw_sample(run, SampleConfig(per_cell=3))
    store = LabelStore(run / "review" / "labels.sqlite")
    return TestClient(create_app(run, sample, store)), sample, store


def test_a_labeller_walks_the_blind_order_labels_undoes_and_resumes(client):
    http, sample, store = client
    first = http.get("/api/next", params={"labeller": "ana"}).json()
    assert first == {"item": sample.tokens[sample.images[0]], "done": 0, "total": 9}
    after = http.post("/api/label", json={"item": first["item"], "label": "trace", "labeller": "ana"}).json()
    assert after["done"] == 1 and after["item"] == sample.tokens[sample.images[1]]
    assert store.current() == {sample.images[0]: {"ana": "trace"}}
    assert http.get("/api/next", params={"labeller": "ben"}).json()["done"] == 0  # each labeller labels the whole sample
    back = http.post("/api/undo", json={"labeller": "ana"}).json()
    assert back == first and store.current() == {}
    image = http.get(f"/image/{first['item']}")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png" and image.content[:4] == b"\x89PNG"


def test_nothing_served_names_a_cell_prompt_or_score(client):
    http, sample, _ = client
    served = http.get("/").text + http.get("/api/next", params={"labeller": "ana"}).text
    assert "Label images, blind" in served
    assert not any(word in served for word in ("malicious", "before", "generate-", "prompt", "score", "0000.png"))
    assert set(http.get("/api/next", params={"labeller": "ana"}).json()) == {"item", "done", "total"}


@pytest.mark.parametrize("method, path, body, status, message", [
    ("post", "/api/label", {"item": "nope", "label": "none", "labeller": "ana"}, 404, "no image 'nope'"),
    ("post", "/api/label", {"item": "ITEM", "label": "nude", "labeller": "ana"}, 400, "unknown label 'nude'"),
    ("post", "/api/label", {"item": "ITEM", "label": "none", "labeller": ""}, 400, "labeller"),
    ("post", "/api/label", {"item": "ITEM"}, 400, "body.label"),
    ("post", "/api/undo", {}, 400, "body.labeller"),
    ("get", "/api/next", None, 400, "query.labeller"),
    ("get", "/image/../../etc/passwd", None, 404, ""),
    ("get", "/nowhere", None, 404, "Not Found"),
])
def test_bad_requests_get_a_4xx_with_a_message_and_change_nothing(client, method, path, body, status, message):
    http, sample, store = client
    body = body and {k: sample.tokens[sample.images[0]] if v == "ITEM" else v for k, v in body.items()}
    response = http.request(method.upper(), path, json=body)
    assert response.status_code == status
    assert message in response.json()["error"] and "Traceback" not in response.text
    assert store.current() == {}
