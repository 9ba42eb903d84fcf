"""The run-directory files: readers never raise on a half-written file, writers never leave one."""

import json
import math

from labkit import runfiles


def test_read_json_is_empty_for_missing_torn_or_non_object_files(tmp_path):
    assert runfiles.read_json(tmp_path / "none.json") == {}
    (tmp_path / "torn.json").write_text('{"state": "runn')
    assert runfiles.read_json(tmp_path / "torn.json") == {}
    (tmp_path / "list.json").write_text("[1, 2]")
    assert runfiles.read_json(tmp_path / "list.json") == {}
    runfiles.write_json_atomic(tmp_path / "ok.json", {"state": "running"})
    assert runfiles.read_json(tmp_path / "ok.json") == {"state": "running"}


def test_request_stop_writes_the_reason_whole_and_leaves_no_temp_file(tmp_path):
    runfiles.request_stop(tmp_path, "early termination: rank 4/4")
    assert (tmp_path / runfiles.STOP).read_text() == "early termination: rank 4/4\n"
    assert [p.name for p in tmp_path.iterdir()] == [runfiles.STOP]


def test_finite_number_accepts_only_real_finite_numbers():
    assert runfiles.finite_number(3) == 3.0 and runfiles.finite_number(0.5) == 0.5
    for bad in (True, math.nan, math.inf, "0.5", "N/A", None):
        assert runfiles.finite_number(bad) is None


def test_read_metrics_skips_a_torn_line_and_keeps_the_newest_row_per_step(tmp_path):
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "loss": 1.4}]
    (tmp_path / runfiles.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    assert runfiles.read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.4}]
