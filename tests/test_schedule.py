import pytest

from labkit.config import RunConfig
from labkit.schedule import estimate_total_steps, lr_at, lr_factor


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_warmup_rises_linearly_to_the_peak(schedule):
    factors = [lr_factor(s, 100, schedule, warmup=10) for s in range(10)]
    assert factors == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_factor(10, 100, schedule, warmup=10) == pytest.approx(1.0)


def test_decays_end_at_min_ratio_and_constant_stays():
    assert lr_factor(99, 100, "constant", 0) == 1.0
    assert lr_factor(100, 100, "linear", 0, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(100, 100, "cosine", 0) == pytest.approx(0.0)
    assert lr_factor(50, 100, "cosine", 0) == pytest.approx(0.5)


def test_lr_uses_warmup_ratio_of_total_steps():
    cfg = RunConfig(datasets=["skills"], learning_rate=1e-3, warmup_ratio=0.1, schedule="linear")
    assert lr_at(0, 100, cfg) == pytest.approx(1e-4)
    assert lr_at(9, 100, cfg) == pytest.approx(1e-3)


def test_total_steps_from_catalog_counts():
    cfg = RunConfig(datasets=["skills"], effective_batch_size=100, epochs=2)
    assert estimate_total_steps(cfg) == 2 * 15
    assert estimate_total_steps(cfg.with_updates(max_steps=7)) == 7
