"""Hostile and broken data files: a clear error naming file and line before launch, or skipped and counted."""

import json

import pytest

from labkit import catalog
from labkit.config import RunConfig
from labkit.data import formats
from labkit.data.tokenize import tokenize_records

GOOD = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})


def data_file(tmp_path, *lines: bytes | str, name: str = "d.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join((x.encode() if isinstance(x, str) else x) + b"\n" for x in lines))
    return path


def assert_named_and_skippable(path, line: int, problem: str, good: int = 2):
    with pytest.raises(catalog.DataError, match=rf"{path.name}:{line}: .*{problem}"):
        catalog.load_jsonl(path)
    records, report = catalog.load_jsonl(path, on_error="skip")
    assert len(records) == good and report.skipped == 1


def test_invalid_utf8_names_file_and_line_and_is_skippable(tmp_path):
    path = data_file(tmp_path, GOOD, GOOD.replace('"a"', '"caf\xe9"').encode("latin-1"), GOOD)
    assert_named_and_skippable(path, 2, "not valid UTF-8")


def test_lone_surrogate_is_refused_before_the_tokenizer(tmp_path):
    path = data_file(tmp_path, GOOD, GOOD.replace('"a"', '"\\ud800"'), GOOD)
    assert_named_and_skippable(path, 2, "lone UTF-16 surrogate")


def test_deeply_nested_json_names_file_and_line_and_is_skippable(tmp_path):
    path = data_file(tmp_path, GOOD, GOOD, "[" * 100_000 + "]" * 100_000)
    assert_named_and_skippable(path, 3, "nested too deeply")


def test_huge_line_is_refused_by_size_without_parsing(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "MAX_RECORD_BYTES", 1000)
    big = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * 5000}]})
    path = data_file(tmp_path, GOOD, big, GOOD)
    assert_named_and_skippable(path, 2, "over the 0 MB limit")


class CountingTokenizer:
    """The real tokenizer, recording how many characters it is asked to encode."""

    def __init__(self, tok):
        self.tok, self.chars = tok, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __len__(self):
        return len(self.tok)

    def __call__(self, texts, **kw):
        self.chars += sum(map(len, texts))
        return self.tok(texts, **kw)


def test_text_far_longer_than_max_seq_len_is_dropped_without_tokenizing_it(tiny_dir):
    from transformers import AutoTokenizer

    tok, n = CountingTokenizer(AutoTokenizer.from_pretrained(tiny_dir)), 2_000_000
    huge = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * n}]}
    samples, report = tokenize_records([huge, json.loads(GOOD)], tok, max_seq_len=64)
    assert len(samples) == 1 and report["dropped_overlong"] == 1
    assert tok.chars < 1000


def test_content_as_a_list_of_text_parts_is_joined(tmp_path):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello, "},
                                                       {"type": "text", "text": "world"}]},
                          {"role": "assistant", "content": "Hi."}]}
    records, _ = catalog.load_jsonl(data_file(tmp_path, json.dumps(parts)))
    assert records[0]["messages"][0]["content"] == "Hello, world"


def test_image_parts_are_refused_naming_the_field(tmp_path):
    parts = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "Hi."}]}
    with pytest.raises(catalog.DataError, match=r"d.jsonl:1: messages\[0\].content\[0\]: only text parts"):
        catalog.load_jsonl(data_file(tmp_path, json.dumps(parts)))


def test_directory_where_a_file_is_expected_says_so(tmp_path):
    (tmp_path / "data.jsonl").mkdir()
    with pytest.raises(catalog.CatalogError, match="is a directory, not a data file"):
        catalog.resolve(str(tmp_path / "data.jsonl"))


def test_empty_data_file_is_an_error_not_zero_samples(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(catalog.CatalogError, match="empty.jsonl: the data file is empty"):
        catalog.resolve(str(tmp_path / "empty.jsonl"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(catalog.CatalogError, match="holds no usable records"):
        catalog.load_jsonl(tmp_path / "blank.jsonl")


def test_run_config_reaches_the_loader_with_skip_and_check_names_the_bad_line(tmp_path):
    path = data_file(tmp_path, GOOD, b"\xff\xfe", GOOD)
    problems = RunConfig(datasets=[str(path)]).check()
    assert any(f"{path}:2: not valid UTF-8" in p for p in problems)
    assert RunConfig(datasets=[str(path)], on_bad_record="skip", effective_batch_size=2).check() == []
