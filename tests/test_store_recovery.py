"""The catalog is a cache of the run files: a broken lab.duckdb is rebuilt, edits and dead runs are seen."""

import json
import os
import subprocess

import pytest
from test_store import append, rows, write_run

from labkit import cli, liveness, runfiles
from labkit.store import Store


@pytest.fixture
def root(tmp_path):
    return tmp_path / "runs"


def synced_root(root, n_runs=3, steps=400):
    for i in range(n_runs):
        write_run(root, f"r{i}", rows(steps), state="finished")
    Store(root, auto_sync=False).sync()
    return root / "lab.duckdb"


def warnings_in(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if "warning" in ln]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "zeros"])
def test_a_broken_catalog_is_set_aside_and_rebuilt_with_one_warning(root, capsys, damage):
    db = synced_root(root)
    good = db.read_bytes()
    db.write_bytes({"truncated": good[: len(good) // 3], "garbage": b"not a database" * 100,
                    "zeros": b"\0" * 8192}[damage])
    broken = db.read_bytes()
    capsys.readouterr()
    table = Store(root).runs_table()
    assert sorted(table["run_id"]) == ["r0", "r1", "r2"] and set(table["last_step"]) == {400}
    [aside] = list(root.glob("lab.duckdb.broken-*"))
    assert aside.read_bytes() == broken  # kept, not deleted
    [warning] = warnings_in(capsys.readouterr().err)
    assert "lab.duckdb was unreadable" in warning and aside.name in warning and "rebuilt" in warning
    assert Store(root).sync()["rows"] == 0 and not warnings_in(capsys.readouterr().err)  # healthy again


def test_a_broken_catalog_is_rebuilt_even_without_auto_sync(root, capsys):
    db = synced_root(root)
    db.write_bytes(db.read_bytes()[:4096])
    df = Store(root, auto_sync=False).sql("SELECT count(*) AS n FROM metrics")
    assert df["n"].iloc[0] == 3 * 400
    assert len(warnings_in(capsys.readouterr().err)) == 1


@pytest.mark.parametrize("argv", [["ls"], ["compare"], ["sync"]])
def test_cli_commands_survive_a_truncated_catalog(root, capsys, argv):
    db = synced_root(root)
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 3])
    capsys.readouterr()
    assert cli.main([*argv, "--root", str(root)]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err and len(warnings_in(err)) == 1
    if argv != ["sync"]:
        assert all(f"r{i}" in out for i in range(3))


def test_a_bad_block_in_a_table_no_sync_reads_is_found_by_the_first_sync(root, capsys):
    db = synced_root(root, n_runs=4, steps=20_000)
    data = bytearray(db.read_bytes())
    # Overwrite the middle half of the file (table data blocks), keeping the header and metadata intact.
    lo, hi = len(data) // 4, 3 * len(data) // 4
    data[lo:hi] = bytes(b ^ 0x5A for b in data[lo:hi])
    db.write_bytes(bytes(data))
    assert Store(root).metrics(["r0", "r3"], columns=["loss"], max_points=10).shape[0] == 20
    assert len(list(root.glob("lab.duckdb.broken-*"))) == 1


# -- incremental sync ---------------------------------------------------------------------------------


def edit_in_place(path, old: bytes, new: bytes):
    """Overwrite bytes of a file without replacing it (same inode), as `open(..., 'r+')` does."""
    data = path.read_bytes()
    i = data.index(old)
    with path.open("r+b") as fh:
        fh.seek(i)
        fh.write(new)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # an edit comes later than the sync


def losses(store, run="a"):
    return store.sql(f"SELECT step, loss FROM metrics WHERE run_id = '{run}' ORDER BY step")["loss"].tolist()


def test_an_in_place_edit_of_the_same_size_is_reingested(root):
    d = write_run(root, "a", rows(50, loss=lambda s: 1.5))
    store = Store(root)
    assert losses(store)[0] == 1.5
    edit_in_place(d / runfiles.METRICS, b'"loss": 1.5', b'"loss": 9.5')  # step 1's row
    assert store.sync()["reingested"] == ["a"]
    assert losses(store)[0] == 9.5 and losses(store)[1:] == [1.5] * 49


def test_an_in_place_edit_early_in_the_file_then_an_append_is_reingested(root):
    d = write_run(root, "a", rows(2000, loss=lambda s: 1.5))
    store = Store(root)
    store.sync()
    edit_in_place(d / runfiles.METRICS, b'"loss": 1.5', b'"loss": 7.5')
    append(d, rows(5, start=2001, loss=lambda s: 1.5))
    assert store.sync()["reingested"] == ["a"]
    got = losses(store)
    assert len(got) == 2005 and got[0] == 7.5 and set(got[1:]) == {1.5}


def test_an_edit_that_changes_a_line_length_mid_file_then_an_append_is_reingested(root):
    d = write_run(root, "a", rows(2000, loss=lambda s: 1.5))
    store = Store(root)
    store.sync()
    text = (d / runfiles.METRICS).read_text().replace('"step": 1000, "phase": 0', '"step": 1000, "phase": 10')
    with (d / runfiles.METRICS).open("r+") as fh:  # same inode, rewritten from the start
        fh.write(text)
    append(d, rows(5, start=2001))
    assert store.sync()["reingested"] == ["a"]
    assert store.sql("SELECT phase FROM metrics WHERE step = 1000")["phase"].tolist() == [10]


def test_appends_are_still_read_incrementally(root):
    d = write_run(root, "a", rows(100))
    store = Store(root)
    store.sync()
    append(d, rows(10, start=101))
    result = store.sync()
    assert (result["rows"], result["reingested"]) == (10, [])


# -- liveness -----------------------------------------------------------------------------------------


def test_a_dead_trainer_is_shown_failed_not_running(root):
    proc = subprocess.Popen(["sleep", "60"])
    try:
        d = write_run(root, "a", rows(10), state="running")
        status = json.loads((d / runfiles.STATUS).read_text())
        # As the trainer records itself: pid and process start time (labkit.liveness).
        runfiles.write_json_atomic(d / runfiles.STATUS, {**status, **liveness.identity(proc.pid)})
        store = Store(root)
        assert store.runs_table()["status"].tolist() == ["running"]
    finally:
        proc.kill()
        proc.wait()
    # No file changed: the sync must notice the dead process by itself.
    for live in (False, True):
        row = store.runs_table(live=live).iloc[0]
        assert (row["status"], row["last_step"]) == ("failed", 10)
        assert "exited without a final status" in row["error"]
    assert runfiles.read_status(d)["state"] == "running"  # the store reports, it does not rewrite run files
