import pytest

from relapse.io import publish


def test_publish_renames_into_place_and_keeps_an_output_another_writer_finished_first(tmp_path):
    mine, out = tmp_path / "x.partial", tmp_path / "x"
    mine.mkdir()
    (mine / "a.png").write_text("mine")
    publish(mine, out)
    assert (out / "a.png").read_text() == "mine" and not mine.exists()
    late = tmp_path / "x.partial-late"
    late.mkdir()
    (late / "a.png").write_text("late")
    publish(late, out)  # the step was done by the first writer: that output stays, this one goes
    assert (out / "a.png").read_text() == "mine" and not late.exists()
    with pytest.raises(OSError):
        publish(tmp_path / "missing", tmp_path / "y")  # a real failure still surfaces
