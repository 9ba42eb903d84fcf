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
    assert "early score" in index and "final loss" in index
    assert (root / "rep__good" / "report.html").is_file()


def test_reports_embed_charts_and_load_no_remote_scripts(root):
    pages = [root / "index.html", *root.glob("*/report.html")]
    for page in pages:
        text = page.read_text()
        assert "<script src=\"http" not in text and "<script src='http" not in text, page
        assert "cdn.jsdelivr" not in text and "require.min.js" not in text, page
    run_page = (root / "rep__good" / "report.html").read_text()
    assert "data:image/svg+xml;base64" in run_page or "<svg" in run_page
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
