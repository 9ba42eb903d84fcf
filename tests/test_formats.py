"""Every format and container goes through one converter and trains a tiny model step."""

import glob
import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from labkit import catalog
from labkit.cli import main
from labkit.data import formats
from labkit.data.collate import collate_padded
from labkit.data.tokenize import IGNORE, tokenize_records

ROWS = {
    "chat": [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                           {"role": "assistant", "content": str(i + 1)}]} for i in range(4)],
    "sharegpt": [{"conversations": [{"from": "human", "value": f"What is {i} + 1?"},
                                    {"from": "gpt", "value": str(i + 1)}]} for i in range(4)],
    "alpaca": [{"instruction": "Add one.", "input": str(i), "output": str(i + 1)} for i in range(4)],
    "prompt-completion": [{"prompt": f"What is {i} + 1?", "completion": str(i + 1)} for i in range(4)],
    "text": [{"text": f"{i} plus one is {i + 1}."} for i in range(4)],
}


def write(path: Path, rows: list[dict]) -> Path:
    kind = formats.FILE_KINDS.get(path.suffix)
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    else:
        ds = datasets.Dataset.from_list(rows)
        if kind == "parquet":
            ds.to_parquet(str(path))
        elif kind == "csv":
            ds.to_csv(str(path), index=False)
        else:
            ds.save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir), AutoModelForCausalLM.from_pretrained(tiny_dir)


def train_step(tiny, records) -> float:
    tok, model = tiny
    samples, report = tokenize_records(records, tok, 256)
    assert report["samples"] == len(records) and report["labelled_turns"] == report["turns_with_end"]
    out = model(**collate_padded(samples, tok.pad_token_id))
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.get_input_embeddings().weight.grad is not None
    model.zero_grad()
    return out.loss.item()


# Every format as JSONL, and every other container with some format (CSV holds no nested lists).
CASES = [(fmt, ".jsonl") for fmt in ROWS] + [("sharegpt", ".json"), ("alpaca", ".parquet"),
                                             ("prompt-completion", ".csv"), ("chat", ""), ("text", ".parquet")]


@pytest.mark.parametrize("fmt,suffix", CASES)
def test_each_format_and_container_converts_and_trains(tmp_path, tiny, fmt, suffix):
    path = write(tmp_path / f"data{suffix or '_dir'}", ROWS[fmt])
    card = catalog.resolve(str(path))  # format sniffed
    assert card.format == fmt
    records, report = formats.read(card)
    assert report.loaded == 4 and all(r["messages"][-1]["role"] == "assistant" for r in records)
    assert records[0]["messages"][-1]["content"] == {"text": "0 plus one is 1."}.get(fmt, "1")
    train_step(tiny, records)


def test_alpaca_becomes_a_user_turn_with_the_input_and_an_assistant_turn():
    rec = formats.convert({"instruction": "Add one.", "input": "4", "output": "5", "system": "Be exact."}, "alpaca")
    assert rec["messages"] == [{"role": "system", "content": "Be exact."},
                               {"role": "user", "content": "Add one.\n\n4"}, {"role": "assistant", "content": "5"}]


def test_card_maps_fields_and_roles(tmp_path, tiny):
    rows = [{"dialog": [{"speaker": "asker", "text": "Hi?"}, {"speaker": "bot", "text": "Hello."}]}]
    write(tmp_path / "odd.jsonl", rows)
    (tmp_path / "odd.yaml").write_text(
        "name: odd\npath: odd.jsonl\nformat: sharegpt\nfields: {messages: dialog, role: speaker, content: text}\n"
        "roles: {asker: user}\n")
    records, _ = formats.read(catalog.cards(tmp_path)["odd"])
    assert records[0]["messages"] == [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]


def test_wrong_format_names_file_record_field_and_hints_the_right_one(tmp_path):
    write(tmp_path / "share.parquet", ROWS["sharegpt"])
    (tmp_path / "share.yaml").write_text("name: share\npath: share.parquet\nformat: chat\n")
    with pytest.raises(catalog.DataError, match=r"share\.parquet:record 1: missing 'messages' "
                       r"\(looks like sharegpt: set format: sharegpt"):
        formats.read(catalog.cards(tmp_path)["share"])


def test_missing_field_in_a_later_parquet_record_is_named(tmp_path):
    rows = ROWS["alpaca"][:2] + [{"instruction": "Add one.", "input": "9", "output": None}]
    write(tmp_path / "a.parquet", rows)
    with pytest.raises(catalog.DataError, match=r"a\.parquet:record 3: missing 'output'"):
        formats.read(str(tmp_path / "a.parquet"))


def test_dataset_in_the_local_hf_cache_is_read_by_name_offline(tmp_path, monkeypatch, tiny):
    # What an earlier online load_dataset("labkit-test/pets") leaves in the datasets cache.
    src = write(tmp_path / "pets.jsonl", ROWS["prompt-completion"])
    datasets.load_dataset("json", data_files=str(src), cache_dir=str(tmp_path / "build"))
    built = Path(glob.glob(str(tmp_path / "build" / "json" / "*" / "*" / "*"))[0])
    dst = tmp_path / "cache" / "labkit-test___pets" / "default" / built.parts[-2] / built.parts[-1]
    shutil.copytree(built, dst)
    for f in dst.glob("json-*.arrow"):
        f.rename(f.with_name(f.name.replace("json-", "pets-")))
    info = json.loads((dst / "dataset_info.json").read_text())
    (dst / "dataset_info.json").write_text(json.dumps({**info, "config_name": "default", "dataset_name": "pets"}))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    records, report = formats.read("hf:labkit-test/pets")
    assert report.loaded == 4 and records[1]["messages"][1]["content"] == "2"
    train_step(tiny, records)
    with pytest.raises(catalog.CatalogError, match="not in the local Hugging Face cache"):
        formats.read("hf:labkit-test/absent")


def test_data_add_sniffs_the_format_and_writes_a_card_that_loads(tmp_path, capsys):
    path = write(tmp_path / "qa.parquet", ROWS["alpaca"])
    assert main(["data", "add", str(path), "--name", "qa", "--kind", "skills", "--catalog", str(tmp_path)]) == 0
    card = catalog.cards(tmp_path)["qa"]
    assert (card.format, card.samples, card.kind) == ("alpaca", 4, "skills")
    catalog.validate_catalog(tmp_path)


def test_run_config_check_reads_the_dataset_through_the_converter(tmp_path):
    from labkit.config import RunConfig

    path = write(tmp_path / "bad.jsonl", ROWS["chat"][:2] + [{"messages": [{"role": "user", "content": "q"}]}])
    assert any(f"{path}:3: no assistant turn" in p for p in RunConfig(datasets=[str(path)]).check())
    ok = write(tmp_path / "ok.parquet", ROWS["alpaca"])
    assert RunConfig(datasets=[str(ok)], effective_batch_size=2).check() == []


def test_plain_text_trains_every_token_of_the_text(tiny):
    tok, _ = tiny
    samples, _ = tokenize_records([formats.convert(ROWS["text"][0], "text")], tok, 256)
    trained = tok.decode([x for x in samples[0].labels if x != IGNORE])
    assert trained == "0 plus one is 1.<|end|>"


@pytest.mark.slow
def test_alpaca_parquet_card_trains_through_python_m_labkit_train(tmp_path, tiny_dir):
    import os
    import subprocess
    import sys

    from labkit.config import RunConfig

    cat = tmp_path / "catalog"
    cat.mkdir()
    rows = [{"instruction": "Add one.", "input": str(i), "output": str(i + 1)} for i in range(16)]
    write(cat / "qa.parquet", rows)
    (cat / "qa.yaml").write_text("name: qa\npath: qa.parquet\nkind: skills\nformat: alpaca\n")
    cfg = RunConfig(name="alpaca", runs_root=str(tmp_path / "runs"), model=str(tiny_dir), datasets=["qa"],
                    max_steps=2, effective_batch_size=4, max_seq_len=128, max_tokens_per_device=512)
    path = cfg.save(tmp_path / "config.yaml")
    env = {**os.environ, "LABKIT_CATALOG": str(cat), "LABKIT_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-m", "labkit.train", str(path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = json.loads((tmp_path / "runs" / "alpaca" / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 2
