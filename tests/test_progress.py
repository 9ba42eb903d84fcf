"""Progress in a log file: complete plain lines, the first and last step always, others every `every` s."""

from labkit.progress import Progress, duration_text, progress_line


def row(step: int, **kw) -> dict:
    return {"step": step, "samples": 8 * step, "loss": 2.5, "grad_norm": 0.75, "lr": 2e-5, "tokens_per_s": 12345.6,
            **kw}


def test_a_log_file_gets_the_first_step_then_one_line_per_interval_and_the_last_step():
    lines: list[str] = []
    p = Progress(total_steps=50, initial=0, enabled=True, log=lines.append, every=3600, terminal=False)
    for s in range(1, 51):
        p.update(row(s))
    p.close()
    assert [line.split(" · ")[0] for line in lines] == ["step 1/50 (2%)", "step 50/50 (100%)"]
    assert " · eta " in lines[0] and "eta" not in lines[1]  # nothing left to wait for at the last step


def test_every_interval_gets_a_line_and_a_resumed_run_counts_from_where_it_resumed():
    lines: list[str] = []
    p = Progress(total_steps=10, initial=6, enabled=True, log=lines.append, every=0, terminal=False)
    for s in range(7, 11):
        p.update(row(s))
    assert [line.split(" · ")[0] for line in lines] == [f"step {s}/10 ({s / 10:.0%})" for s in range(7, 11)]


def test_other_ranks_print_nothing():
    lines: list[str] = []
    p = Progress(total_steps=3, initial=0, enabled=False, log=lines.append, terminal=False)
    for s in range(1, 4):
        p.update(row(s))
    assert lines == []


def test_the_line_reads_as_people_read_numbers():
    line = progress_line(row(120, samples=3840, val_loss=2.25), 1000, 312)
    assert line == ("step 120/1000 (12%) · samples 3,840 · loss 2.5000 · val_loss 2.2500 · grad_norm 0.750 · "
                    "lr 2.00e-05 · 12,346 tok/s · eta 5m12s")
    assert [duration_text(x) for x in (42, 312, 11220)] == ["42s", "5m12s", "3h07m"]
