import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from labkit import catalog
from labkit.buildonce import MARKER
from labkit.catalog import DataError
from labkit.data.tokenize import tokenize_records
from labkit.data.tokenstore import (
    ConcatStore,
    StoreWriter,
    TokenStore,
    build_store,
    cache_key,
    load_tokenized,
)

QWEN_STYLE = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def records(n_long: int = 2, n_short: int = 3) -> list[dict]:
    short = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    long = {"messages": [{"role": "user", "content": "Tell me everything. " * 10},
                         {"role": "assistant", "content": "Everything is fine. " * 10}]}
    return [long] * n_long + [short] * n_short


def write_jsonl(path, recs) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def as_lists(store) -> list[tuple[list[int], list[int]]]:
    return [(np.asarray(s.input_ids).tolist(), np.asarray(s.labels).tolist()) for s in (store[i] for i in
                                                                                        range(len(store)))]


@pytest.mark.parametrize("name", ["knowledge", "skills"])
def test_store_holds_exactly_the_tokenized_samples_of_a_shipped_dataset(name, tok, tiny_dir, tmp_path):
    path = catalog.resolve(name).path
    store, report = load_tokenized(path, tok, tiny_dir, 512, cache_dir=tmp_path)
    expected, expected_report = tokenize_records(catalog.load(name), tok, 512)
    assert as_lists(store) == [(s.input_ids, s.labels) for s in expected]
    assert store.lengths.tolist() == [len(s.input_ids) for s in expected]
    assert report["samples"] == expected_report["samples"] == len(store)
    assert store.ids.tolist() == [t for s in expected for t in s.input_ids]  # the flat map, in order


def test_second_load_maps_the_built_store(tok, tiny_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    write_jsonl(data, records())
    first, r1 = load_tokenized(data, tok, tiny_dir, 256, cache_dir=tmp_path / "cache")
    second, r2 = load_tokenized(data, tok, tiny_dir, 256, cache_dir=tmp_path / "cache")
    assert (r1["cached"], r2["cached"]) == (False, True)
    assert as_lists(second) == as_lists(first) and r2["samples"] == r1["samples"] == 5
    entries = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]


def test_store_is_rebuilt_when_settings_options_or_data_change(tok, tiny_dir, tmp_path):
    data, cache = tmp_path / "chat.jsonl", tmp_path / "cache"
    write_jsonl(data, records())
    load_tokenized(data, tok, tiny_dir, 256, cache_dir=cache)
    _, r = load_tokenized(data, tok, tiny_dir, 128, cache_dir=cache)
    assert not r["cached"] and r["dropped_overlong"] == 2
    _, r = load_tokenized(data, tok, tiny_dir, 128, overlong="truncate", cache_dir=cache)
    assert not r["cached"] and r["truncated"] == 2
    key = cache_key(data, tok, tiny_dir, 256, "drop")
    assert cache_key(data, tok, tiny_dir, 256, "drop", options={"label": "last_turn"}) != key
    assert cache_key(data, tok, tiny_dir, 256, "drop", on_error="skip") != key
    time.sleep(0.01)
    write_jsonl(data, records(n_long=0))
    store, r = load_tokenized(data, tok, tiny_dir, 256, cache_dir=cache)
    assert not r["cached"] and len(store) == 3


def test_store_is_rebuilt_when_the_chat_template_changes(tok, tiny_dir, tmp_path):
    data, cache = tmp_path / "chat.jsonl", tmp_path / "cache"
    write_jsonl(data, records())
    load_tokenized(data, tok, tiny_dir, 256, cache_dir=cache)
    other = AutoTokenizer.from_pretrained(tiny_dir)
    other.chat_template = QWEN_STYLE
    _, r = load_tokenized(data, other, tiny_dir, 256, cache_dir=cache)
    assert not r["cached"]


def test_data_digest_is_streamed_and_follows_in_place_edits(tok, tiny_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    write_jsonl(data, records())
    memo = tmp_path / "memo"
    a = cache_key(data, tok, tiny_dir, 256, "drop", memo_dir=memo)
    assert cache_key(data, tok, tiny_dir, 256, "drop", memo_dir=memo) == a and len(list(memo.iterdir())) == 1
    text = data.read_text()
    data.write_text(text.replace("Hello.", "Howdy."))  # same size, new bytes: mtime_ns moves on
    assert cache_key(data, tok, tiny_dir, 256, "drop", memo_dir=memo) != a


def test_bad_line_names_file_and_line_or_is_skipped(tok, tiny_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    write_jsonl(data, records(n_long=0, n_short=2) + [{"messages": [{"role": "user", "content": "no answer"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl:3: no assistant turn"):
        load_tokenized(data, tok, tiny_dir, 256, cache_dir=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != ".digests"]  # no entry
    store, r = load_tokenized(data, tok, tiny_dir, 256, cache_dir=tmp_path / "cache", on_error="skip")
    assert len(store) == 2 and r["skipped"] == 1


def test_torn_store_without_its_marker_is_rebuilt(tok, tiny_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    write_jsonl(data, records())
    store, _ = load_tokenized(data, tok, tiny_dir, 256, cache_dir=tmp_path / "cache")
    expected = as_lists(store)
    entry = store.directory
    del store
    (entry / MARKER).unlink()  # as a build killed before its last write leaves it
    (entry / "ids.bin").write_bytes(b"\0" * 8)
    again, r = load_tokenized(data, tok, tiny_dir, 256, cache_dir=tmp_path / "cache")
    assert not r["cached"] and as_lists(again) == expected and (entry / MARKER).is_file()


def test_process_pool_writes_the_same_store_as_one_process(tok, tmp_path):
    recs = catalog.load("skills")[:300] + catalog.load("knowledge")[:100]
    (tmp_path / "one").mkdir()
    (tmp_path / "pool").mkdir()
    r1 = build_store(tmp_path / "one", recs, tok, 256, workers=1)
    r2 = build_store(tmp_path / "pool", recs, tok, 256, workers=2, chunk_records=37, pool_min_records=100)
    assert json.loads((tmp_path / "pool" / "meta.json").read_text())["workers"] == 2  # the pool really ran
    for name in ("ids.bin", "labels.bin", "lengths.npy", "offsets.npy"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "pool" / name).read_bytes(), name
    assert r1 == r2 and r1["samples"] == 400


def test_concatenated_stores_index_in_order(tok, tiny_dir, tmp_path):
    a_path, b_path = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a_path, records(n_long=1, n_short=1))
    write_jsonl(b_path, records(n_long=0, n_short=2))
    a, _ = load_tokenized(a_path, tok, tiny_dir, 256, cache_dir=tmp_path / "cache")
    b, _ = load_tokenized(b_path, tok, tiny_dir, 256, cache_dir=tmp_path / "cache")
    both = ConcatStore([a, b])
    assert len(both) == 4 and both.lengths.tolist() == [*a.lengths, *b.lengths]
    assert as_lists(both) == as_lists(a) + as_lists(b)


RACER = textwrap.dedent("""
    import hashlib, json, os, sys, time
    from pathlib import Path
    from transformers import AutoTokenizer
    from labkit.data.tokenstore import load_tokenized
    data, model, cache, go = map(Path, sys.argv[1:5])
    tok = AutoTokenizer.from_pretrained(model)
    while not go.exists():
        time.sleep(0.005)
    store, report = load_tokenized(data, tok, model, 512, cache_dir=cache, workers=1)
    print(json.dumps({"cached": report["cached"], "samples": len(store),
                      "ids": hashlib.sha256(store.ids.tobytes()).hexdigest(),
                      "labels": hashlib.sha256(store.labels.tobytes()).hexdigest()}))
""")


def test_processes_started_together_build_the_store_once_and_read_the_same_data(tiny_dir, tmp_path):
    data = catalog.resolve("knowledge").path
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(data), str(tiny_dir), str(tmp_path / "cache"),
                               str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["cached"] for o in outs) == [False, True]  # built exactly once, opened by the other
    assert len({(o["samples"], o["ids"], o["labels"]) for o in outs}) == 1
    assert outs[0]["samples"] == 384
    assert len(TokenStore(next(p for p in (tmp_path / "cache").iterdir() if (p / MARKER).exists()))) == 384


def test_store_sent_to_another_process_reopens_and_reads_the_same_samples(tok, tiny_dir, tmp_path):
    import pickle

    data = tmp_path / "chat.jsonl"
    write_jsonl(data, records())
    store, _ = load_tokenized(data, tok, tiny_dir, 256, cache_dir=tmp_path / "cache")
    assert as_lists(pickle.loads(pickle.dumps(store))) == as_lists(store)


@pytest.mark.slow
def test_memory_bench_runs_small_and_meets_its_targets(tmp_path):
    out = tmp_path / "data_memory.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "data_memory.py"), "--samples", "3000", "--records",
                          "60", "--ranks", "1", "2", "--workers", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["ok"] and [n["ranks"] for n in result["ranks_on_node"]] == [1, 2]
    assert result["store"]["samples"] == 3000 and result["tokenize"][0]["samples"] == 60


def private_bytes() -> int:
    fields = dict(line.split()[:2] for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return (int(fields["Private_Clean:"]) + int(fields["Private_Dirty:"])) * 1024


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux smaps_rollup")
def test_reading_samples_does_not_grow_private_memory_with_the_data_read(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(200, 1200, 6000).astype(np.int32)
    ids = rng.integers(0, 32000, int(lengths.sum()), dtype=np.int32)  # ~28 MB of ids and labels
    writer = StoreWriter(tmp_path)
    writer.add(ids, ids, lengths)
    writer.finish({"source": "synthetic"})
    store = TokenStore(tmp_path)
    picks = rng.permutation(len(store))[:1500]
    before = private_bytes()
    read = sum(int(store[int(i)].input_ids.nbytes) * 2 for i in picks)
    grown = private_bytes() - before
    assert read > 5 * 2**20 and grown < 2**20  # read 5+ MB of samples, kept under 1 MB of it
    assert store[int(picks[0])].input_ids.tolist() == ids[int(store.offsets[picks[0]]):][:lengths[picks[0]]].tolist()


def test_editing_a_cards_field_mapping_rebuilds_the_store(tok, tiny_dir, tmp_path):
    rows = [{"q": "Capital of Varnholt?", "short": "Quillmere.", "long": "Quillmere, on the Silverrun."}]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    card_file = tmp_path / "qa.yaml"
    answers = []
    for field in ("short", "long"):  # the same data file, read through another field
        card_file.write_text(f"name: qa\npath: qa.jsonl\nformat: alpaca\nfields: {{instruction: q, output: {field}}}\n")
        store, _ = load_tokenized(catalog.cards(tmp_path)["qa"], tok, tiny_dir, 512, cache_dir=tmp_path / "cache")
        labels = np.asarray(store[0].labels)
        answers.append(tok.decode(labels[labels >= 0]))
    assert answers[0].startswith("Quillmere.") and answers[1].startswith("Quillmere, on the Silverrun.")
