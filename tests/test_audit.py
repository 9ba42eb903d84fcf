"""The masking audit counts what training will see and fails fast on what would train badly."""

import json

from transformers import AutoTokenizer

from labkit.cli import main
from labkit.data import audit


def test_audit_of_a_shipped_dataset_counts_labels_and_end_tokens(tiny_dir):
    result, samples = audit.audit("knowledge", "tiny")
    assert result.records == result.samples == 384 and result.strategy == "placeholder"
    assert result.labelled_turns == result.turns_with_end == 384 and result.no_label == 0
    assert 0 < result.labelled_tokens < result.tokens and sum(result.length_histogram.values()) == 384
    assert result.problems() == []


def test_audit_fails_fast_when_samples_are_dropped(tmp_path):
    path = tmp_path / "long.jsonl"
    long = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path.write_text(json.dumps(long) + "\n" + json.dumps(short) + "\n")
    result, _ = audit.audit(str(path), "tiny", max_seq_len=64)
    assert result.dropped_overlong == 1 and any("overlong" in p for p in result.problems())
    assert main(["data", "check", str(path), "--max-seq-len", "64"]) == 1


def test_sample_html_colours_labelled_and_unlabelled_tokens(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    result, samples = audit.audit("skills", tokenizer=tok)
    page = audit.sample_html(samples, tok, n=2)
    assert page.count("#c8f7c5") > 1 and page.count("#eee") > 1 and page.count("<div style") == 2
