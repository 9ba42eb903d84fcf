import altair as alt
import numpy as np
import pandas as pd
import pytest

from labkit import runfiles, viz
from labkit.config import RunConfig
from labkit.schedule import lr_at
from labkit.store import Store


def data_of(chart: alt.TopLevelMixin) -> list[dict]:
    spec = chart.to_dict()  # validates against the Vega-Lite schema
    (values,) = spec["datasets"].values()
    return values


@pytest.fixture
def store(tmp_path):
    """A 2x2 sweep of finished runs (3,000 steps each) with a final eval."""
    root = tmp_path / "runs"
    for i, (lr, bs) in enumerate([(1e-5, 16), (1e-5, 64), (1e-4, 16), (1e-4, 64)]):
        cfg = RunConfig(name=f"r{i}", runs_root=str(root), datasets=["skills"], learning_rate=lr,
                        effective_batch_size=bs)
        d = cfg.save(cfg.run_dir / "config.yaml").parent
        runfiles.write_json_atomic(d / runfiles.STATUS, {"state": "finished", "step": 3000})
        writer = runfiles.MetricsWriter(d)
        for s in range(1, 3001):
            writer.write({"step": s, "samples": s * bs, "loss": 2 / s ** 0.3, "grad_norm": 1.0 + i})
        writer.close()
        (d / "evals").mkdir()
        runfiles.write_json_atomic(d / "evals" / "3000.json", {
            "run": d.name, "step": 3000, "samples": 3000 * bs, "checkpoint": "c", "time": 0,
            "results": [{"task": "mc", "metric": "acc", "value": 0.5 - 0.1 * i, "stderr": 0.02}]})
    return Store(root)


def test_labkit_theme_is_registered_and_active():
    assert "labkit" in alt.theme.names() and alt.theme.active == "labkit"


def test_curves_from_the_store_colored_by_a_config_field(store, tmp_path):
    df = store.metrics(x="samples", columns=["loss"], max_points=1500, color_by="learning_rate")
    assert len(df) == 6000
    chart = viz.curves(df, y="loss", x="samples", color="learning_rate")
    values = data_of(chart)
    assert len(values) <= viz.MAX_ROWS and {v["run_id"] for v in values} == {"r0", "r1", "r2", "r3"}
    enc = chart.to_dict()["encoding"]
    assert enc["color"]["field"] == "learning_rate" and enc["detail"]["field"] == "run_id"
    png = viz.save(chart, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_thin_any_frame_over_the_row_limit_instead_of_raising():
    n = 3 * 4000
    df = pd.DataFrame({"run": np.repeat(["a", "b", "c"], 4000), "step": np.tile(np.arange(1, 4001), 3),
                       "value": np.tile(np.linspace(0, 1, 4000), 3)})
    values = data_of(viz.curves(df, y="value", x="step", color="run"))
    assert len(df) == n and len(values) <= viz.MAX_ROWS
    per_run = pd.DataFrame(values).groupby("run")
    assert per_run.size().min() > 1000  # every line kept, each averaged down
    assert per_run["step"].max().min() > 3990 and per_run["value"].mean().round(2).eq(0.5).all()


def test_curves_accept_an_empty_frame_and_dotted_config_columns():
    data_of(viz.curves(pd.DataFrame({"step": [], "value": [], "metric": []}), y="value", color="metric"))
    df = pd.DataFrame({"run_id": ["a", "a", "b", "b"], "step": [1, 2, 1, 2], "loss": [2.0, 1.0, 2.5, 1.5],
                       "distributed.num_processes": [1, 1, 2, 2]})
    enc = viz.curves(df, color="distributed.num_processes").to_dict()["encoding"]
    assert enc["color"]["field"] == "distributed\\.num_processes"


def test_early_scatter_colors_runs_by_final_score(store, tmp_path):
    early = store.early_dynamics(first_steps=100)
    df = early.merge(store.final_scores("mc", "acc")[["run_id", "value"]], on="run_id")
    chart = viz.early_scatter(df, color="value")
    spec = chart.to_dict()
    assert spec["encoding"]["x"]["field"] == "grad_norm_mean" and spec["encoding"]["y"]["field"] == "loss_mean"
    assert {t["field"] for t in spec["encoding"]["tooltip"]} >= {"run_id", "value"}
    svg = viz.save(chart, tmp_path / "early.svg").read_text()
    assert svg.startswith("<svg") and "grad_norm_mean" in svg


def test_early_scatter_samples_huge_frames():
    df = pd.DataFrame({"run_id": [f"r{i}" for i in range(6000)], "grad_norm_mean": np.arange(6000.0),
                       "loss_mean": np.ones(6000), "early_score": np.ones(6000)})
    assert len(data_of(viz.early_scatter(df))) == viz.MAX_ROWS


def test_sweep_heatmap_averages_each_grid_cell(store):
    df = store.early_dynamics(first_steps=50, include=["learning_rate", "effective_batch_size"])
    df = pd.concat([df, df.assign(early_score=df["early_score"] + 1)])  # two seeds per cell
    values = pd.DataFrame(data_of(viz.sweep_heatmap(df)))
    assert len(values) == 4 and values["runs"].eq(2).all()
    cell = values[(values.learning_rate == 1e-4) & (values.effective_batch_size == 64)]
    expect = df[(df.learning_rate == 1e-4) & (df.effective_batch_size == 64)]["early_score"].mean()
    assert cell["early_score"].item() == pytest.approx(expect)


def test_sweep_heatmap_bins_a_random_search_axis():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"learning_rate": 10 ** rng.uniform(-6, -3, 200), "effective_batch_size": 32,
                       "value": rng.random(200)})
    values = pd.DataFrame(data_of(viz.sweep_heatmap(df, value="value")))
    assert len(values) <= 8 and values["runs"].sum() == 200
    with pytest.raises(KeyError, match="no column"):
        viz.sweep_heatmap(df, value="early_score")


def test_lr_schedule_previews_labkit_schedule():
    cfg = RunConfig(datasets=["skills"], schedule="cosine", warmup_steps=10, learning_rate=1e-4, min_lr_ratio=0.1)
    values = pd.DataFrame(data_of(viz.lr_schedule(cfg, total_steps=200)))
    assert len(values) == 200
    for step in (1, 10, 11, 100, 200):  # 1-based steps on the chart, 0-based in lr_at
        assert values.loc[values.step == step, "lr"].item() == pytest.approx(lr_at(step - 1, 200, cfg))
    assert values["lr"].max() == pytest.approx(1e-4) and values["lr"].iloc[-1] == pytest.approx(1e-5, rel=0.01)
    long = pd.DataFrame(data_of(viz.lr_schedule(cfg, total_steps=100_000)))
    assert len(long) <= 1002 and long["lr"].max() == pytest.approx(1e-4) and 10 in set(long.step)


def test_lr_preview_is_the_trainers_schedule_for_phased_runs_cut_by_max_steps():
    from labkit.schedule import run_schedule

    cfg = RunConfig(phases=[{"datasets": ["knowledge"]}, {"datasets": ["skills"]}], effective_batch_size=64,
                    schedule="cosine", warmup_steps=2, learning_rate=1e-3, min_lr_ratio=0.1, max_steps=9)
    values = pd.DataFrame(data_of(viz.lr_schedule(cfg)))
    assert values["lr"].tolist() == pytest.approx(run_schedule(cfg).lrs())


def test_html_is_self_contained(tmp_path):
    chart = viz.curves(pd.DataFrame({"run_id": ["a"] * 3, "step": [1, 2, 3], "loss": [3.0, 2.0, 1.0]}))
    html = viz.save(chart, tmp_path / "c.html").read_text()
    assert "<script src" not in html.replace(" ", "") and "vegaEmbed" in html and len(html) > 100_000
    with pytest.raises(ValueError, match="save as .png, .svg or .html"):
        viz.save(chart, tmp_path / "c.pdf")
