"""Offline HTML reports from executed notebooks, and the runs index.

One real sweep (a trainable tiny run and a run whose dataset does not exist) is executed with
papermill; its run notebooks are then rendered.
"""

from __future__ import annotations

import re

import pytest

from labkit import report, sweep

TINY = {
    "model": "tiny",
    "datasets": ["knowledge"],
    "max_steps": 4,
    "effective_batch_size": 8,
    "max_tokens_per_device": 2048,
    "max_seq_len": 256,
    "learning_rate": 3.0e-3,
    "save_final": False,
    "distributed": {"cpu": True},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("runs")
    spec = {"name": "rep", "base": TINY, "runs": [{"name": "good"}, {"name": "broken", "datasets": ["nope"]}],
            "concurrency": 2, "parameters": {"evaluate_tasks": [], "poll_seconds": 0.5}}
    sweep.run_sweep(spec, root, log=lambda _: None)
    report.build_reports(root)
    return root


def test_index_links_every_run_report_with_its_status(root):
    index = (root / "index.html").read_text()
    assert 'href="rep__good/report.html"' in index and 'href="rep__broken/report.html"' in index
    assert re.search(r'class="state finished" title="max_steps">finished<', index)
    assert re.search(r'class="state failed"[^>]*>failed<', index)
    for col in ("early_score", "val_loss", "learning_rate", "started", "duration"):
        assert f"<th>{col}</th>" in index
    assert "addEventListener('click'" in index  # the inline sorter: no script from anywhere else
    assert (root / "rep__good" / "report.html").is_file()


def test_reports_embed_charts_and_load_no_remote_scripts(root):
    pages = [root / "index.html", *root.glob("*/report.html")]
    for page in pages:
        text = page.read_text()
        assert "<script src=\"http" not in text and "<script src='http" not in text, page
        assert "cdn.jsdelivr" not in text and "require.min.js" not in text, page
    run_page = (root / "rep__good" / "report.html").read_text()
    # Interactive charts (hover, zoom) with vega, vega-lite and vega-embed inlined once.
    assert run_page.count("vegaEmbed(\"#labkit-chart-") >= 1 and "window.vegaEmbed=" in run_page
    assert "[recorded run]" not in run_page  # record outputs are data, not report content
    assert "all runs</a>" in run_page  # the back link to the index


def test_failed_run_report_shows_the_error(root):
    page = (root / "rep__broken" / "report.html").read_text()
    assert "ConfigError" in page and "nope" in page


def test_reports_rerender_only_when_the_notebook_changed(root):
    page = root / "rep__good" / "report.html"
    before = page.stat().st_mtime_ns
    report.build_reports(root)
    assert page.stat().st_mtime_ns == before
    report.build_reports(root, force=True)
    assert page.stat().st_mtime_ns > before


def test_recorded_reads_back_the_run_summary(root):
    rec = report.recorded(root / "rep__good" / "report.ipynb")
    assert rec["run"]["state"] == "finished" and rec["run"]["step"] == 4
    assert rec["run"]["final_loss"] > 0


def test_build_reports_names_a_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such runs root"):
        report.build_reports(tmp_path / "nowhere")


def test_labkit_report_command_prints_the_index(root, capsys):
    from labkit.cli import main

    assert main(["report", str(root)]) == 0
    assert capsys.readouterr().out.strip() == str((root / "index.html").resolve())


def test_a_run_report_reads_like_a_report(root):
    page = (root / "rep__good" / "report.html").read_text()
    assert "injected-parameters" not in page and "config_path" not in page  # no papermill parameters cell
    assert "adam_beta2" in page and "set by" in page  # the full resolved config, defaults included
    assert " step 1/" not in page and "samples 8/" not in page  # no progress lines from the batch monitor


def test_sweep_report_title_comes_from_its_axes():
    spec = sweep.as_spec({"name": "s", "base": TINY, "axes": {"effective_batch_size": [8, 16],
                                                              "learning_rate": [1e-3, 1e-2]}})
    assert report.sweep_title(spec) == "s: effective batch size x learning rate (4 runs)"


def test_any_run_dir_gets_a_report_cli_runs_included(tmp_path, tiny_dir, capsys):
    from labkit.cli import main
    from labkit.launch import get

    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({**TINY, "name": "cli-run"}))
    assert main(["run", str(cfg), "--root", str(tmp_path / "runs"), "--wait"]) == 0
    run = get("cli-run", tmp_path / "runs")
    assert not (run.dir / "report.ipynb").exists()
    capsys.readouterr()
    assert main(["report", str(run.dir)]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str((run.dir / "report.html").resolve())
    page = (run.dir / "report.html").read_text()
    assert "cli-run" in page and "vegaEmbed(" in page and "finished" in page
    assert run.state() == "finished" and len(run.metrics()) == 4  # nothing was launched again


def test_charts_need_no_network_in_jupyterlab_or_in_batch_runs():
    import altair as alt
    import pandas as pd

    chart = alt.Chart(pd.DataFrame({"x": [1, 2], "y": [3, 4]})).mark_line().encode(x="x", y="y")
    try:
        report.setup(interactive=False)
        bundle = alt.renderers.get()(chart.to_dict())
        assert set(bundle) == {report.VEGA_MIME, "image/svg+xml", "text/plain"} and "<svg" in bundle["image/svg+xml"]
        report.setup(interactive=True)
        assert alt.renderers.active == "jupyter" and alt.renderers.options.get("offline") is True
        assert alt.JupyterChart._esm and "cdn.jsdelivr" not in str(alt.JupyterChart._esm)[:5000]
    finally:
        alt.renderers.enable("default")
