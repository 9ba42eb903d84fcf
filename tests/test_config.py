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

    recipe = load_config(Path("templates/runs/paper_recipe.yaml"), check=True)
    assert (recipe.effective_batch_size, recipe.learning_rate, recipe.schedule, recipe.warmup_steps) == (
        3840, 2e-5, "constant", 0)
    tulu = load_config(Path("templates/runs/tulu_baseline.yaml"), check=True)
    assert (tulu.effective_batch_size, tulu.schedule, tulu.warmup_ratio) == (128, "linear", 0.03)
