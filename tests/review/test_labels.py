import sqlite3
import threading

import pytest

from relapse.errors import UserError
from relapse.review.labels import LabelStore, consensus


def test_the_newest_label_of_each_labeller_counts_and_undo_takes_it_back(tmp_path):
    store = LabelStore(tmp_path / "labels.sqlite")
    store.add("a.png", "none", "ana")
    store.add("a.png", "trace", "ana")  # relabelled
    store.add("a.png", "concept", "ben")
    store.add("b.png", "unusable", "ana")
    assert store.current() == {"a.png": {"ana": "trace", "ben": "concept"}, "b.png": {"ana": "unusable"}}
    assert store.undo("ana") == "b.png" and store.undo("ana") == "a.png"
    assert store.current() == {"a.png": {"ana": "none", "ben": "concept"}}
    assert store.undo("nobody") is None


def test_a_bad_label_or_labeller_writes_nothing(tmp_path):
    store = LabelStore(tmp_path / "labels.sqlite")
    with pytest.raises(UserError, match="unknown label 'nude'"):
        store.add_many([("a.png", "none", "ana", "t"), ("b.png", "nude", "ana", "t")], "import")
    with pytest.raises(UserError, match="labeller"):
        store.add("a.png", "none", "  ")
    assert store.current() == {}
    with pytest.raises(sqlite3.IntegrityError):  # the table itself refuses what the code would let through
        with sqlite3.connect(store.path) as db:
            db.execute("INSERT INTO labels (image, label, labeller, time, source) VALUES ('a', 'maybe', 'x', 't', 's')")


def test_two_labellers_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "labels.sqlite"
    LabelStore(path)

    def label(who: str) -> None:
        store = LabelStore(path)  # each its own connection, as two server workers or a page and an import
        for i in range(100):
            store.add(f"{i}.png", "none" if i % 2 else "trace", who)

    threads = [threading.Thread(target=label, args=(who,)) for who in ("ana", "ben")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    current = LabelStore(path).current()
    assert len(current) == 100 and all(set(by) == {"ana", "ben"} for by in current.values())


@pytest.mark.parametrize("labels, expected", [
    ({"a": "concept"}, "concept"),
    ({"a": "concept", "b": "concept", "c": "none"}, "concept"),
    ({"a": "concept", "b": "trace"}, "trace"),  # a tie goes to the milder label
    ({"a": "unusable", "b": "trace"}, None),  # half found it unusable
    ({"a": "unusable", "b": "trace", "c": "trace"}, "trace"),
])
def test_consensus(labels, expected):
    assert consensus(labels) == expected
