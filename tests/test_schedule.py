import pytest

from labkit.config import RunConfig
from labkit.schedule import estimate_total_steps, lr_at, lr_factor, run_schedule


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


def phased(**kw) -> RunConfig:
    return RunConfig(**{"phases": [{"datasets": ["knowledge"], "epochs": 2}, {"datasets": ["skills"]}],
                        "effective_batch_size": 100, "learning_rate": 1e-3, **kw})


def test_each_epoch_is_ceil_of_samples_over_batch_and_max_steps_cuts_the_run():
    assert run_schedule(phased(), [384, 1500]).phase_steps == (2 * 4, 15)
    assert run_schedule(phased(max_steps=10), [384, 1500]).phase_steps == (8, 2)
    assert run_schedule(phased(max_steps=5), [384, 1500]).phase_steps == (5, 0)
    assert run_schedule(phased(), [384, 1500]).phase_steps == run_schedule(phased()).phase_steps  # catalog counts


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_a_schedule_cut_by_max_steps_decays_over_the_steps_that_run(schedule):
    cfg = RunConfig(datasets=["skills"], effective_batch_size=10, schedule=schedule, min_lr_ratio=0.1,
                    learning_rate=1e-3, max_steps=20)  # 150 steps planned, 20 run
    lrs = run_schedule(cfg, [1500]).lrs()
    assert len(lrs) == 20
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-3 * lr_factor(19, 20, schedule, 0, 0.1))
    assert lrs[-1] < 0.2e-3  # reached the end of the decay, not 13% of the way into it


def test_phases_restart_the_schedule_with_their_own_warmup():
    cfg = phased(schedule="cosine", warmup_ratio=0.25, max_steps=12)
    sched = run_schedule(cfg, [384, 1500])
    assert sched.phase_steps == (8, 4) and sched.warmup == (2, 1)
    lrs = sched.lrs()
    assert lrs[:8] == pytest.approx([1e-3 * lr_factor(s, 8, "cosine", 2) for s in range(8)])
    assert lrs[8:] == pytest.approx([1e-3 * lr_factor(s, 4, "cosine", 1) for s in range(4)])
    assert [sched.lr(s) for s in range(12)] == lrs
    assert sched.locate(8) == (1, 0)
    with pytest.raises(IndexError):
        sched.lr(12)


def test_the_preview_total_is_the_schedule_total():
    cfg = phased(max_steps=10)
    assert estimate_total_steps(cfg) == run_schedule(cfg).total_steps == 10


@pytest.mark.slow
def test_the_trainer_uses_exactly_the_run_schedule(tmp_path):
    # Two phases of knowledge (384 samples: 6 steps of 64 each); max_steps=10 cuts phase 2 to 4 steps.
    from labkit import runfiles
    from labkit.train import train

    cfg = RunConfig(name="lr", runs_root=str(tmp_path), model="tiny", seed=3, max_seq_len=256,
                    max_tokens_per_device=2048, effective_batch_size=64, learning_rate=1e-3, schedule="cosine",
                    warmup_steps=1, min_lr_ratio=0.1, max_steps=10, save_final=False,
                    phases=[{"datasets": ["knowledge"]}, {"datasets": ["knowledge"]}])
    assert train(cfg)["state"] == "finished"
    logged = [r["lr"] for r in runfiles.read_metrics(cfg.run_dir)]
    assert logged == pytest.approx(run_schedule(cfg, [384, 384]).lrs())
