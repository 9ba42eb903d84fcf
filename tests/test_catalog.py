import json

import pytest

from labkit import catalog
from labkit.data import generate


def test_shipped_catalog_validates_and_counts_match_cards():
    reports = catalog.validate_catalog()
    assert set(reports) == {"knowledge", "skills", "eval_mc", "eval_exact"}
    kinds = {c.name: c.kind for c in catalog.cards().values()}
    assert kinds == {"knowledge": "knowledge", "skills": "skills", "eval_mc": "eval", "eval_exact": "eval"}


def test_shipped_data_is_what_the_generator_writes(tmp_path):
    generate.write(tmp_path)
    for card in catalog.cards().values():
        assert (tmp_path / "data" / card.path.name).read_bytes() == card.path.read_bytes(), card.name


def test_shipped_data_is_small():
    total = sum(c.path.stat().st_size for c in catalog.cards().values())
    assert total < 5 * 2**20


def test_eval_items_never_appear_in_training():
    train_prompts = {r["messages"][0]["content"] for n in ("knowledge", "skills") for r in catalog.load(n)}
    for name in ("eval_mc", "eval_exact"):
        for r in catalog.load(name):
            assert r["question"] not in train_prompts


def test_mc_items_have_the_gold_answer_among_four_choices():
    for r in catalog.load("eval_mc"):
        assert len(set(r["choices"])) == 4
        assert r["choices"][r["gold"]] == r["answer"]


@pytest.mark.parametrize(
    "line, problem",
    [
        ("{not json", "invalid JSON"),
        ('{"text": "hi"}', "missing 'messages'"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}', "empty content"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant turn"),
    ],
)
def test_bad_lines_are_named_by_file_and_line(tmp_path, line, problem):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n")
    with pytest.raises(catalog.DataError) as err:
        catalog.load_jsonl(path)
    assert err.value.line == 3
    assert str(err.value).startswith(f"{path}:3: ")
    assert problem in str(err.value)


def test_skip_mode_keeps_good_lines_and_counts_bad_ones(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path = tmp_path / "mixed.jsonl"
    path.write_text(f"{good}\n{{oops\n{good}\n")
    records, report = catalog.load_jsonl(path, on_error="skip")
    assert len(records) == 2 and report.skipped == 1
    assert report.problems[0].startswith(f"{path}:2:")


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(catalog.CatalogError, match="'nope' is not in the data catalog.*knowledge"):
        catalog.resolve("nope")


def test_card_with_wrong_sample_count_is_reported(tmp_path):
    (tmp_path / "data.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n"
    )
    (tmp_path / "mine.yaml").write_text("name: mine\npath: data.jsonl\nkind: skills\nsamples: 3\n")
    with pytest.raises(catalog.CatalogError, match="mine.yaml: card says 3 samples"):
        catalog.validate_catalog(tmp_path)


def test_loading_a_card_path_reads_it_as_its_card_says(tmp_path, monkeypatch):
    rows = [{"dialog": [{"who": "asker", "text": "q"}, {"who": "bot", "text": "a"}]}]
    (tmp_path / "odd.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "odd.yaml").write_text("name: odd\npath: odd.jsonl\nformat: sharegpt\n"
                                       "fields: {messages: dialog, role: who, content: text}\nroles: {asker: user}\n")
    monkeypatch.setenv("LABKIT_CATALOG", str(tmp_path))
    records, report = catalog.load_jsonl(tmp_path / "odd.jsonl")  # what the trainer's loader calls
    assert report.loaded == 1 and records[0]["messages"][0] == {"role": "user", "content": "q"}


def test_hub_dataset_card_keeps_its_name_as_the_path(tmp_path):
    (tmp_path / "hub.yaml").write_text("name: pets\npath: hf:labkit-test/pets\nformat: prompt-completion\n")
    assert str(catalog.cards(tmp_path)["pets"].path) == "hf:labkit-test/pets"
