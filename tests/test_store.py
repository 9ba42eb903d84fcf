import fcntl
import json
import multiprocessing
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from labkit import runfiles
from labkit.config import RunConfig
from labkit.store import Store


def rows(steps, bs=8, loss=lambda s: 2.0 - 0.01 * s, gn=lambda s: 1.0, start=1, t0=1.7e9):
    """metrics.jsonl rows as the trainer writes them (docs/run-dir.md)."""
    return [{"step": s, "phase": 0, "epoch": s * bs / 1000, "samples": s * bs, "tokens": s * bs * 100,
             "loss_tokens": bs * 50, "loss": loss(s), "grad_norm": gn(s), "lr": 1e-4, "tokens_per_s": 1000.0,
             "samples_per_s": 10.0, "step_time": 0.5, "packing_efficiency": 0.9, "peak_mem_mb": 100.0,
             "time": 0.5 * s, "ts": t0 + s} for s in range(start, start + steps)]


def write_run(root, name, metric_rows=(), state="running", torn="", **cfg):
    cfg = RunConfig(name=name, runs_root=str(root), datasets=["skills"], **cfg)
    cfg.save(cfg.run_dir / "config.yaml")
    last = metric_rows[-1] if metric_rows else {}
    runfiles.write_json_atomic(cfg.run_dir / runfiles.STATUS, {
        "state": state, "pid": 1, "step": last.get("step", 0), "samples": last.get("samples", 0),
        "total_steps": 100, "total_samples": 800, "started_at": 1.7e9, "updated_at": 1.7e9 + 5,
        "ended_at": None, "error": None, "stop_reason": None})
    append(cfg.run_dir, metric_rows, torn)
    return cfg.run_dir


def append(run_dir, metric_rows, torn=""):
    with (run_dir / runfiles.METRICS).open("a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in metric_rows) + torn)


def write_eval(run_dir, step, results, samples=None):
    (run_dir / "evals").mkdir(exist_ok=True)
    (run_dir / "evals" / f"{step}.json").write_text(json.dumps({
        "run": run_dir.name, "step": step, "samples": samples if samples is not None else step * 8,
        "checkpoint": "x", "time": 1.7e9, "results": results}))


def acc(value, task="labkit_knowledge_mc"):
    return [{"task": task, "metric": "acc", "value": value, "stderr": 0.01}]


def tables(store):
    with store.catalog() as con:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in ("runs", "metrics", "evals")}


@pytest.fixture
def root(tmp_path):
    return tmp_path / "runs"


def test_sync_twice_is_the_same_as_once(root):
    a = write_run(root, "a", rows(20), learning_rate=1e-4)
    write_run(root, "b", rows(30), effective_batch_size=16)
    write_eval(a, 20, acc(0.4))
    store = Store(root, auto_sync=False)
    first = store.sync()
    assert (first["runs"], first["rows"], first["evals"]) == (2, 50, 1)
    before = tables(store)
    second = store.sync()
    assert (second["rows"], second["meta"], second["evals"], second["reingested"]) == (0, 0, 0, [])
    assert tables(store) == before


def test_runs_table_has_flattened_config_summaries_and_best_evals(root):
    a = write_run(root, "a", rows(10, loss=lambda s: 3.0 - 0.1 * s), learning_rate=3e-4,
                  distributed={"num_processes": 2}, state="finished")
    write_run(root, "b", rows(5), learning_rate=1e-5)
    write_eval(a, 5, acc(0.30))
    write_eval(a, 10, acc(0.35) + [{"task": "exact", "metric": "word_perplexity", "value": 9.0, "stderr": None}])
    write_eval(a, 8, [{"task": "exact", "metric": "word_perplexity", "value": 7.0, "stderr": "N/A"}])
    df = Store(root).runs_table().set_index("run_id")
    assert Store(root).runs_table(live=True).set_index("run_id").equals(df)
    assert df.loc["a", "learning_rate"] == 3e-4 and df.loc["a", "distributed.num_processes"] == 2
    assert df.loc["a", "effective_batch_size"] == 32 and df.loc["a", "status"] == "finished"
    assert df.loc["a", "last_step"] == 10 and df.loc["a", "samples"] == 80
    assert df.loc["a", "last_loss"] == pytest.approx(2.0) and df.loc["a", "min_loss"] == pytest.approx(2.0)
    assert df.loc["a", "labkit_knowledge_mc/acc"] == pytest.approx(0.35)  # higher is better
    assert df.loc["a", "exact/word_perplexity"] == pytest.approx(7.0)  # lower is better
    assert np.isnan(df.loc["b", "labkit_knowledge_mc/acc"])
    picked = Store(root).runs_table(filter_sql='"distributed.num_processes" = 2 AND learning_rate > 1e-4')
    assert picked["run_id"].tolist() == ["a"]
    with pytest.raises(ValueError, match="filter_sql 'no_such_column = 1'"):
        Store(root).runs_table(filter_sql="no_such_column = 1")


def test_torn_last_line_is_ignored_then_read_once_complete(root):
    line = json.dumps(rows(1, start=11)[0])
    run = write_run(root, "a", rows(10), torn=line[:25])
    store = Store(root, auto_sync=False)
    assert store.sync()["rows"] == 10
    assert store.live().execute("SELECT count(*), max(step) FROM metrics").fetchone() == (10, 10)
    append(run, [], torn=line[25:] + "\n")
    assert store.sync()["rows"] == 1
    got = store.sql("SELECT step, loss, samples FROM metrics WHERE step = 11").iloc[0].tolist()
    assert got == [11, pytest.approx(1.89), 88]
    assert store.sql("SELECT count(*) AS n FROM metrics")["n"][0] == 11


def test_resumed_steps_appended_again_keep_the_newest_row(root):
    run = write_run(root, "a", rows(10))
    store = Store(root, auto_sync=False)
    store.sync()
    # The trainer resumed from step 6: steps 6..12 are logged again with new values.
    append(run, rows(7, start=6, loss=lambda s: 9.0))
    assert store.sync()["rows"] == 7
    df = store.sql("SELECT step, loss FROM metrics ORDER BY step")
    assert df["step"].tolist() == list(range(1, 13))
    assert df["loss"].tolist()[5:] == [9.0] * 7 and df["loss"][4] == pytest.approx(1.95)
    live = store.live().execute("SELECT step, loss FROM metrics ORDER BY step").df()
    assert live.equals(df)


def test_duplicates_within_one_chunk_keep_the_last_line(root):
    write_run(root, "a", rows(5) + rows(3, start=2, loss=lambda s: 7.0))
    store = Store(root)
    assert store.sql("SELECT loss FROM metrics ORDER BY step")["loss"].tolist() == \
        [pytest.approx(1.99), 7.0, 7.0, 7.0, pytest.approx(1.95)]


def test_truncated_metrics_file_is_reingested_from_scratch(root):
    run = write_run(root, "a", rows(10))
    store = Store(root, auto_sync=False)
    store.sync()
    # A resume from the checkpoint at step 4 rewrites the file (new inode), then logs on.
    writer = runfiles.MetricsWriter(run, truncate_after_step=4)
    for r in rows(3, start=5, loss=lambda s: 5.0):
        writer.write(r)
    writer.close()
    result = store.sync()
    assert result["reingested"] == ["a"]
    df = store.sql("SELECT step, loss FROM metrics ORDER BY step")
    assert df["step"].tolist() == list(range(1, 8)) and df["loss"].tolist()[4:] == [5.0] * 3


def test_file_rewritten_in_place_to_a_larger_size_is_noticed(root):
    run = write_run(root, "a", rows(5))
    store = Store(root, auto_sync=False)
    store.sync()
    (run / runfiles.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows(8, loss=lambda s: 4.0)))
    assert store.sync()["reingested"] == ["a"]
    assert store.sql("SELECT count(*) AS n, max(loss) AS hi, min(loss) AS lo FROM metrics").iloc[0].tolist() == \
        [8, 4.0, 4.0]


def test_removed_run_directory_leaves_the_catalog(root):
    import shutil

    write_run(root, "a", rows(3))
    b = write_run(root, "b", rows(3))
    write_eval(b, 3, acc(0.5))
    store = Store(root, auto_sync=False)
    store.sync()
    shutil.rmtree(b)
    assert store.sync()["removed"] == ["b"]
    counts = store.sql("SELECT (SELECT count(*) FROM runs) r, (SELECT count(*) FROM metrics) m, "
                       "(SELECT count(*) FROM evals) e")
    assert counts.iloc[0].tolist() == [1, 3, 0]


def test_bad_config_and_eval_files_are_reported_without_stopping_the_sync(root):
    write_run(root, "good", rows(3))
    bad = root / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text("datasets: [skills]\nlearning_rte: 0.1\n")
    append(bad, rows(2))
    write_eval(bad, 2, [{"task": "x"}])
    result = Store(root, auto_sync=False).sync()
    assert result["runs"] == 2 and result["rows"] == 5
    text = "\n".join(result["errors"])
    assert f"{bad / 'config.yaml'}" in text and "learning_rte: unknown field" in text
    assert f"{bad / 'evals' / '2.json'}: results[0] needs 'task', 'metric' and 'value'" in text


def _sync_in_child(root, out):
    from labkit.store import Store

    out.put(Store(root).sync()["rows"])


def test_two_processes_syncing_at_once_ingest_each_row_once(root):
    for i in range(6):
        write_run(root, f"r{i}", rows(300))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_sync_in_child, args=(str(root), out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(out.get(timeout=5) for _ in procs) == [0, 1800]  # one ingested, the other found nothing new
    assert Store(root).sql("SELECT count(*) AS n, count(DISTINCT (run_id, step)) AS d FROM metrics")\
        .iloc[0].tolist() == [1800, 1800]


WRITER = textwrap.dedent("""
    import json, sys, time
    path, n = sys.argv[1], int(sys.argv[2])
    with open(path, "a") as fh:
        for s in range(1, n + 1):
            line = json.dumps({"step": s, "samples": 8 * s, "loss": 1.0 / s, "grad_norm": 1.0}) + "\\n"
            fh.write(line[:7]); fh.flush()      # a torn line, visible to readers for a moment
            time.sleep(0.002)
            fh.write(line[7:]); fh.flush()
""")


def test_live_view_and_sync_work_while_another_process_appends(root):
    run = write_run(root, "live")
    store = Store(root)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run / runfiles.METRICS), "400"])
    seen, syncs = [], 0
    try:
        while writer.poll() is None:
            con = store.live()
            n, steps = con.execute("SELECT count(*), count(DISTINCT step) FROM metrics").fetchone()
            con.close()
            assert n == steps
            seen.append(n)
            store.sync()
            syncs += 1
    finally:
        writer.wait(60)
    assert writer.returncode == 0 and syncs >= 2
    assert seen == sorted(seen) and seen[-1] <= 400
    assert store.live().execute("SELECT count(*) FROM metrics").fetchone()[0] == 400
    df = store.sql("SELECT step FROM metrics ORDER BY step")
    assert df["step"].tolist() == list(range(1, 401))


def test_queries_wait_for_a_sync_and_time_out_with_a_clear_error(root):
    write_run(root, "a", rows(3))
    store = Store(root, lock_timeout=0.2)
    store.sync()
    with open(store.lock, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # as a long sync in another process would
        with pytest.raises(TimeoutError, match="lab.duckdb.lock: still locked"):
            store.runs_table()
        assert len(store.runs_table(live=True)) == 1  # live views take no lock


def test_early_dynamics_ranks_low_grad_norm_and_high_loss_first(root):
    # Inside the first 10 steps: a has the lowest grad norm and highest loss, d the opposite.
    # After step 10 the order flips, so a wrong window would give a wrong ranking.
    def flip(early, late):
        return lambda s: early if s <= 10 else late

    write_run(root, "a", rows(30, gn=flip(0.5, 9.0), loss=flip(3.0, 0.1)))
    write_run(root, "b", rows(30, gn=flip(1.0, 9.0), loss=flip(2.5, 0.1)))
    write_run(root, "c", rows(30, gn=flip(2.0, 0.1), loss=flip(2.0, 9.0)))
    write_run(root, "d", rows(30, gn=flip(4.0, 0.1), loss=flip(1.0, 9.0)))
    write_run(root, "short", rows(4, gn=flip(0.1, 0.1), loss=flip(9.0, 9.0)))
    df = Store(root).early_dynamics(first_steps=10, include=["learning_rate"])
    assert df["run_id"].tolist() == ["short", "a", "b", "c", "d"]
    assert df["rank"].tolist() == [1, 2, 3, 4, 5]
    row = df.set_index("run_id").loc["a"]
    assert (row.n_steps, row.grad_norm_mean, row.grad_norm_median, row.loss_mean) == (10, 0.5, 0.5, 3.0)
    assert df.set_index("run_id")["complete"].to_dict() == {"short": False, "a": True, "b": True, "c": True,
                                                           "d": True}
    assert df["early_score"].is_monotonic_decreasing and df["learning_rate"].notna().all()
    late = Store(root).early_dynamics(first_steps=30, runs=["a", "b", "c", "d"])
    assert late["run_id"].tolist()[0] in ("c", "d")


def test_early_dynamics_over_samples_compares_runs_at_equal_samples_seen(root):
    write_run(root, "small", rows(40, bs=8, gn=lambda s: 1.0 if s <= 10 else 5.0))
    write_run(root, "big", rows(20, bs=32, gn=lambda s: 2.0 if s <= 2 else 0.1))
    df = Store(root).early_dynamics(first_samples=80).set_index("run_id")
    assert df.loc["small", "n_steps"] == 10 and df.loc["big", "n_steps"] == 2
    assert df.loc["small", "rank"] == 1


def test_diverged_runs_get_no_score_and_rank_last(root):
    write_run(root, "ok", rows(10))
    write_run(root, "nan", rows(10, loss=lambda s: float("nan") if s == 3 else 1.0))  # json writes NaN
    df = Store(root).early_dynamics(first_steps=10).set_index("run_id")
    assert df.loc["nan", "n_nonfinite"] == 1 and np.isnan(df.loc["nan", "early_score"])
    assert df.loc["nan", "rank"] == 2 and df.loc["ok", "rank"] == 1


def test_early_score_can_be_sql_or_a_callable(root):
    write_run(root, "a", rows(10, gn=lambda s: 1.0))
    write_run(root, "b", rows(10, gn=lambda s: 3.0))
    store = Store(root)
    by_sql = store.early_dynamics(first_steps=5, score="grad_norm_mean")
    assert by_sql["run_id"].tolist() == ["b", "a"] and by_sql["early_score"].tolist() == [3.0, 1.0]
    by_fn = store.early_dynamics(first_steps=5, score=lambda d: -d["grad_norm_mean"])
    assert by_fn["run_id"].tolist() == ["a", "b"]
    with pytest.raises(ValueError, match="score='nope"):
        store.early_dynamics(score="nope + 1")
    with pytest.raises(KeyError, match="no run.*'zz'"):
        store.early_dynamics(runs=["a", "zz"])


def test_correlation_of_early_signals_with_final_score_has_the_right_sign(root):
    rng = np.random.default_rng(0)
    for i in range(8):
        g = 0.5 + i * 0.3
        d = write_run(root, f"r{i}", rows(20, gn=lambda s, g=g: g * (1 + 0.01 * rng.standard_normal()),
                                          loss=lambda s: 2.0 + rng.random() * 0.01))
        write_eval(d, 10, acc(0.1))
        write_eval(d, 20, acc(0.9 - 0.1 * i))  # the final eval: lower early grad norm, better model
    corr = Store(root).correlate_early_with_final("labkit_knowledge_mc", "acc", first_steps=10).set_index("signal")
    assert corr.loc["grad_norm_mean", "rho"] == pytest.approx(-1.0)
    assert corr.loc["early_score", "rho"] > 0.5
    assert corr.loc["grad_norm_mean", "n"] == 8
    final = Store(root).final_scores("labkit_knowledge_mc", "acc")
    assert final["step"].eq(20).all() and final["run_id"].iloc[0] == "r0"
    with pytest.raises(KeyError, match="the store has: labkit_knowledge_mc/acc"):
        Store(root).final_scores("labkit_knowledge_mc", "acc_norm")


def test_metrics_are_downsampled_in_sql_to_the_point_budget(root):
    write_run(root, "long", rows(5000, loss=lambda s: 1.0 + (s % 2)))
    write_run(root, "short", rows(50), learning_rate=1e-3)
    store = Store(root)
    df = store.metrics(x="samples", columns=["loss", "grad_norm"], max_points=300, color_by="learning_rate")
    counts = df.groupby("run_id").size().to_dict()
    assert counts == {"long": 300, "short": 50}
    assert list(df.columns) == ["run_id", "samples", "loss", "grad_norm", "learning_rate"]
    long = df[df.run_id == "long"]
    assert long["samples"].is_monotonic_increasing and long["loss"].mean() == pytest.approx(1.5, abs=0.01)
    assert df.loc[df.run_id == "short", "learning_rate"].eq(1e-3).all()
    raw = store.metrics("long", columns="loss", max_points=10_000)
    smooth = store.metrics("long", columns="loss", max_points=10_000, smooth=0.05)
    assert len(raw) == len(smooth) == 5000 and smooth["loss"].std() < raw["loss"].std() / 10
    with pytest.raises(ValueError, match="x='wall'"):
        store.metrics(x="wall")


def test_align_puts_runs_on_one_samples_grid(root):
    write_run(root, "bs8", rows(100, bs=8, loss=lambda s: 1000.0 / (8 * s)))
    write_run(root, "bs32", rows(10, bs=32, loss=lambda s: 1000.0 / (32 * s)))
    df = Store(root).align(by="samples", metric="loss", points=20)
    grids = df.groupby("run_id")["samples"].apply(list)
    assert grids["bs8"] == grids["bs32"] and len(grids["bs8"]) == 20
    assert grids["bs8"][0] == 32 and grids["bs8"][-1] == 320  # the range both runs cover
    at_160 = df[np.isclose(df["samples"], grids["bs8"][8])]
    assert len(at_160) == 2
