import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit.data.multipack import packing_efficiency, padded_plan_epoch, plan_epoch, steps_in_epoch


@st.composite
def setups(draw):
    budget = draw(st.integers(8, 600))
    lengths = draw(st.lists(st.integers(1, budget), max_size=200))
    return lengths, draw(st.integers(1, 70)), budget, draw(st.integers(1, 8))


def check_plan(plan, lengths, effective_batch_size, num_replicas):
    seen = [i for step in plan for rank in step for mb in rank for i in mb]
    assert sorted(seen) == list(range(len(lengths)))  # every sample exactly once
    sizes = [sum(len(mb) for rank in step for mb in rank) for step in plan]
    assert all(s == effective_batch_size for s in sizes[:-1])
    assert sizes == [] or 1 <= sizes[-1] <= effective_batch_size
    for step in plan:
        assert len(step) == num_replicas
        assert len({len(rank) for rank in step}) == 1  # same micro-batch count on every rank


@settings(max_examples=150, deadline=None)
@given(setups())
def test_packed_plan_covers_the_epoch_exactly_within_budget(setup):
    lengths, ebs, budget, replicas = setup
    plan = plan_epoch(lengths, ebs, budget, replicas, seed=3, epoch=1)
    check_plan(plan, lengths, ebs, replicas)
    assert all(sum(lengths[i] for i in mb) <= budget for step in plan for rank in step for mb in rank)


@settings(max_examples=150, deadline=None)
@given(setups())
def test_padded_plan_covers_the_epoch_with_rows_times_longest_within_budget(setup):
    lengths, ebs, budget, replicas = setup
    plan = padded_plan_epoch(lengths, ebs, budget, replicas, seed=3, epoch=1)
    check_plan(plan, lengths, ebs, replicas)
    for step in plan:
        for rank in step:
            assert all(len(mb) * max(lengths[i] for i in mb) <= budget for mb in rank if mb)


@settings(max_examples=60, deadline=None)
@given(setups())
def test_steps_hold_the_same_samples_whatever_the_number_of_ranks(setup):
    lengths, ebs, budget, _ = setup
    for planner in (plan_epoch, padded_plan_epoch):
        one, eight = planner(lengths, ebs, budget, 1, 0, 0), planner(lengths, ebs, budget, 8, 0, 0)
        assert [sorted(i for r in s for mb in r for i in mb) for s in one] == \
               [sorted(i for r in s for mb in r for i in mb) for s in eight]


def test_plan_is_deterministic_per_seed_and_epoch_and_reshuffled_across_epochs():
    lengths = np.random.default_rng(0).integers(10, 300, 500).tolist()
    assert plan_epoch(lengths, 32, 1024, 4, seed=1, epoch=0) == plan_epoch(lengths, 32, 1024, 4, seed=1, epoch=0)
    first = [sorted(i for r in s for mb in r for i in mb) for s in plan_epoch(lengths, 32, 1024, 4, 1, 0)]
    for other in (plan_epoch(lengths, 32, 1024, 4, 1, 1), plan_epoch(lengths, 32, 1024, 4, 2, 0)):
        assert [sorted(i for r in s for mb in r for i in mb) for s in other] != first


def test_dataset_smaller_than_one_batch_is_one_short_step():
    plan = plan_epoch([5, 7, 9], effective_batch_size=128, max_tokens_per_device=64, num_replicas=8, seed=0, epoch=0)
    assert len(plan) == 1 and sorted(i for r in plan[0] for mb in r for i in mb) == [0, 1, 2]
    assert all(len(rank) == 1 for rank in plan[0])  # five ranks run one empty micro-batch each
    assert plan_epoch([], 4, 64, 2, 0, 0) == []


def test_sample_over_the_budget_is_named_with_the_fix():
    with pytest.raises(ValueError, match=r"sample 2 has 900 tokens, more than max_tokens_per_device=512") as e:
        plan_epoch([10, 20, 900, 30], 2, 512, 1, 0, 0)
    assert "max_seq_len" in str(e.value) and "truncate" in str(e.value)


def test_invalid_batch_settings_are_refused():
    for args in ((0, 64, 1), (4, 0, 1), (4, 64, 0)):
        with pytest.raises(ValueError, match="must be at least 1"):
            plan_epoch([1, 2, 3], *args, seed=0, epoch=0)


def test_whole_step_packing_needs_no_extra_micro_batch_for_one_heavy_rank():
    # 12 samples of a third of the budget fill exactly 4 micro-batches: 2 per rank, none empty.
    plan = plan_epoch([100] * 12, 12, 300, 2, seed=0, epoch=0)
    assert [[len(mb) for mb in rank] for rank in plan[0]] == [[3, 3], [3, 3]]
    assert packing_efficiency(plan[0], [100] * 12, 300) == 1.0


def test_realistic_lengths_pack_tightly_and_balance_ranks():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.0, 0.9, 4096), 50, 2048).astype(int).tolist()
    plan = plan_epoch(lengths, 1024, 8192, 4, seed=0, epoch=0)
    for step in plan:
        total = sum(lengths[i] for r in step for mb in r for i in mb)
        fewest = -(-total // (4 * 8192))  # micro-batches per rank no packing can go below
        assert len(step[0]) <= fewest + 1
        loads = [sum(lengths[i] for mb in r for i in mb) for r in step]
        assert max(loads) - min(loads) <= 0.05 * max(loads)
    assert np.mean([packing_efficiency(s, lengths, 8192) for s in plan]) > 0.9


def test_packing_efficiency_counts_empty_micro_batches_as_wasted_budget():
    step = [[[0, 1], []], [[2], [3]]]
    assert packing_efficiency(step, [10, 20, 30, 40], 50) == pytest.approx(100 / (2 * 2 * 50))


def load_packing_bench():
    spec = importlib.util.spec_from_file_location("packing_bench", Path(__file__).parent.parent / "bench" / "packing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("median,ebs,budget,ranks", [
    (600, 64, 4096, 1), (600, 64, 4096, 4), (600, 256, 8192, 8), (300, 512, 4096, 8), (900, 128, 16384, 2),
])
def test_micro_batches_per_step_are_no_more_than_instructlab_multipack_needs(median, ebs, budget, ranks):
    bench = load_packing_bench()
    lens = bench.lengths(6000, seed=1, median=median, hi=2048)
    cell = bench.run_cell(lens, ebs, budget, ranks, seed=1, previous=False)  # checks exactness and budget too
    assert not cell["instructlab"]["fallback"]
    assert cell["labkit_micro_batches_per_effective_batch"] <= cell["instructlab"]["micro_batches_per_effective_batch"]


def test_step_token_totals_barely_vary_so_every_step_needs_the_same_micro_batches():
    # Plainly shuffled steps of 256 lognormal lengths spread ~6% in tokens; stratified ones far less.
    lengths = np.clip(np.random.default_rng(0).lognormal(6.5, 0.9, 256 * 40), 50, 4096).astype(int)
    plan = plan_epoch(lengths, 256, 16384, 4, seed=0, epoch=0)
    totals = np.array([sum(lengths[i] for r in s for mb in r for i in mb) for s in plan])
    assert totals.std() / totals.mean() < 0.01
    assert len({len(s[0]) for s in plan}) == 1


def test_steps_in_epoch_is_the_plan_length_without_planning():
    for n, ebs in ((0, 4), (1, 4), (8, 4), (9, 4), (1000, 7)):
        assert steps_in_epoch(n, ebs) == len(plan_epoch([10] * n, ebs, 64, 2, 0, 0))
    with pytest.raises(ValueError, match="at least 1"):
        steps_in_epoch(10, 0)


def test_instructlab_count_in_c_matches_the_python_reference():
    bench = load_packing_bench()
    if bench._compiled() is None:
        pytest.skip("no C compiler: the bench counts in Python")
    lens = bench.lengths(4000, seed=2, median=700)
    for ebs, budget, ranks in ((512, 8192, 8), (128, 16384, 1), (1024, 4096, 16)):
        c = bench.instructlab_count(lens, ebs, budget, ranks, seed=2, use_c=True)
        py = bench.instructlab_count(lens, ebs, budget, ranks, seed=2, use_c=False)
        assert c == py


def test_packing_bench_quick_grid_is_within_instructlab_on_every_cell(tmp_path):
    out = tmp_path / "packing.json"
    run = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "bench" / "packing.py"), "--quick",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["all_ok"] and len(result["cells"]) == 16
