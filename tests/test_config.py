import pytest

from labkit.config import ConfigError, RunConfig, from_dict, load_config


def test_yaml_round_trip_is_lossless(tmp_path):
    cfg = RunConfig(name="a", datasets=["skills"], learning_rate=1e-4, schedule="cosine", tags={"k": "v"})
    loaded = load_config(cfg.save(tmp_path / "config.yaml"))
    assert loaded == cfg


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("learning_rate", -1.0, "learning_rate: Input should be greater than 0"),
        ("schedule", "exponential", "schedule: Input should be 'constant', 'cosine' or 'linear'"),
        ("effective_batch_size", 0, "effective_batch_size: Input should be greater than or equal to 1"),
        ("learning_rte", 0.1, "learning_rte: unknown field"),
        ("name", "../evil", "name: '../evil' is not a safe run name"),
    ],
)
def test_invalid_values_get_one_message_per_field(field, value, message):
    with pytest.raises(ConfigError) as err:
        from_dict({"datasets": ["skills"], field: value})
    assert message in str(err.value)


def test_several_problems_are_all_listed(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("datasets: [skills]\nlearning_rate: 0\nepochs: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert text.startswith(f"{path}: invalid run config (2 problem(s))")
    assert "learning_rate" in text and "epochs" in text


def test_missing_dataset_and_model_are_reported_by_check(tmp_path):
    cfg = RunConfig(datasets=["skills", "nope"], model=str(tmp_path / "no-model"))
    problems = cfg.check()
    assert any(p.startswith("model:") and "no config.json" in p for p in problems)
    assert any("'nope' is not in the data catalog" in p for p in problems)


def test_data_comes_from_datasets_or_phases_not_both():
    with pytest.raises(ConfigError, match="either 'datasets'"):
        from_dict({"datasets": ["skills"], "phases": [{"datasets": ["knowledge"]}]})
    with pytest.raises(ConfigError, match="no training data"):
        from_dict({})


def test_stacked_is_one_phase_and_phased_keeps_order():
    stacked = RunConfig(datasets=["knowledge", "skills"], epochs=2)
    assert [(p.datasets, p.epochs) for p in stacked.training_phases()] == [(["knowledge", "skills"], 2)]
    phased = from_dict({"phases": [{"datasets": ["knowledge"], "epochs": 3}, {"datasets": ["skills"]}]})
    assert [p.datasets for p in phased.training_phases()] == [["knowledge"], ["skills"]]


def test_dotted_overrides_as_papermill_gives_them(tmp_path):
    path = RunConfig(datasets=["skills"]).save(tmp_path / "c.yaml")
    cfg = load_config(path, {"distributed.num_processes": 2, "learning_rate": 1e-3})
    assert cfg.distributed.num_processes == 2 and cfg.learning_rate == 1e-3
    assert cfg.with_updates(**{"early_stop.grad_norm_max": 5.0}).early_stop.grad_norm_max == 5.0


def test_flat_view_names_nested_fields_with_dots():
    flat = RunConfig(datasets=["a.jsonl", "b.jsonl"]).flat()
    assert flat["distributed.num_processes"] == 1 and flat["datasets"] == "a.jsonl,b.jsonl"


def test_shipped_templates_are_valid():
    from pathlib import Path

    recipe = load_config(Path("templates/runs/paper_recipe.yaml"))
    assert (recipe.effective_batch_size, recipe.learning_rate, recipe.schedule, recipe.warmup_steps) == (
        3840, 2e-5, "constant", 0)
    # The paper's batch is meant for real data: on the shipped demo data (1884 samples) it is refused.
    assert [p.split(":")[0] for p in recipe.check()] == ["effective_batch_size"]
    tulu = load_config(Path("templates/runs/tulu_baseline.yaml"), check=True)
    assert (tulu.effective_batch_size, tulu.schedule, tulu.warmup_ratio) == (128, "linear", 0.03)


@pytest.mark.parametrize("name", ["run\n", "run\r", " run", "a/b", "..", "-x"])
def test_unsafe_run_names_are_refused_including_a_trailing_newline(name):
    with pytest.raises(ConfigError, match="is not a safe run name"):
        from_dict({"name": name, "datasets": ["skills"]})


@pytest.mark.parametrize("name", ["lab.duckdb", "lab.duckdb.lock", "lab.duckdb.wal", "lab.duckdb.broken-1",
                                  "index.html", "sweeps", "study", "Lab.DuckDB"])
def test_names_of_labkits_own_files_in_the_runs_root_are_reserved(name):
    with pytest.raises(ConfigError) as err:
        from_dict({"name": name, "datasets": ["skills"]})
    assert f"  - name: {name!r} is reserved" in str(err.value)


@pytest.mark.parametrize("field, value", [
    ("weight_decay", float("inf")), ("adam_eps", float("inf")), ("adam_eps", float("nan")),
    ("learning_rate", float("nan")), ("max_grad_norm", float("inf")), ("warmup_ratio", float("nan")),
])
def test_inf_and_nan_are_refused(field, value):
    with pytest.raises(ConfigError) as err:
        from_dict({"datasets": ["skills"], field: value})
    assert f"  - {field}: " in str(err.value)


def test_inf_written_in_yaml_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("datasets: [skills]\nweight_decay: .inf\nearly_stop:\n  loss_max: .nan\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "weight_decay: Input should be a finite number" in str(err.value)
    assert "early_stop.loss_max: Input should be a finite number" in str(err.value)


@pytest.mark.parametrize("seed, ok", [(-1, False), (0, True), (2**32 - 1, True), (2**32, False)])
def test_seed_must_fit_in_32_bits_unsigned(seed, ok):
    if ok:
        assert RunConfig(datasets=["skills"], seed=seed).seed == seed
    else:
        with pytest.raises(ConfigError, match="  - seed: "):
            from_dict({"datasets": ["skills"], "seed": seed})


def test_a_duplicate_key_in_yaml_is_refused_naming_key_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("datasets: [skills]\nlearning_rate: 1.0e-5\nseed: 1\nlearning_rate: 3.0e-4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:4: learning_rate: duplicate key (first at line 2)")
    assert "\n" not in str(err.value)


def test_a_duplicate_nested_key_is_refused_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("datasets: [skills]\ndistributed:\n  num_processes: 2\n  num_processes: 4\n")
    with pytest.raises(ConfigError, match=r":4: num_processes: duplicate key \(first at line 3\)"):
        load_config(path)
    from labkit.config import parse_yaml

    assert parse_yaml("b: &b {x: 1, y: 2}\nc: {<<: *b, y: 3}\n") == {"b": {"x": 1, "y": 2}, "c": {"x": 1, "y": 3}}
