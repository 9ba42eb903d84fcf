"""The masking audit: what a dataset becomes under a model's tokenizer and template, checked whole.

`audit(dataset, model)` tokenizes every record exactly as training will and reports samples,
tokens, the labelled share, samples left with no label, whether every labelled assistant turn
ends in a labelled end-of-turn token, reasoning kept/dropped, truncated/dropped counts, a length
histogram and the strategy used; `problems()` turns fail-fast thresholds into messages.
`sample_html(...)` shows a few samples coloured by label for Jupyter.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from labkit.data.tokenize import IGNORE, TokenizedSample, tokenize_records

BINS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclass
class Audit:
    dataset: str
    model: str
    strategy: str
    end_of_turn: str | None
    records: int
    samples: int
    tokens: int
    labelled_tokens: int
    labelled_share: float
    no_label: int
    dropped_overlong: int
    truncated: int
    skipped: int
    rejected: int
    labelled_turns: int
    turns_with_end: int
    reasoning: str
    reasoning_kept: int
    reasoning_dropped: int
    reasoning_restored: int = 0
    length_histogram: dict[str, int] = field(default_factory=dict)
    max_len: int = 0

    def problems(self, min_labelled_share: float = 0.01, max_no_label_share: float = 0.05,
                 max_dropped_share: float = 0.05) -> list[str]:
        """Fail-fast findings; [] when the dataset trains as intended."""
        out = []
        n = max(self.records, 1)
        if self.samples == 0:
            out.append("no sample survives tokenization")
        if self.samples and self.labelled_share < min_labelled_share:
            out.append(f"only {self.labelled_share:.1%} of tokens are labelled (< {min_labelled_share:.0%})")
        if self.no_label / n > max_no_label_share:
            out.append(f"{self.no_label} samples ({self.no_label / n:.1%}) have no labelled token")
        if (self.dropped_overlong + self.rejected + self.skipped) / n > max_dropped_share:
            out.append(f"{self.dropped_overlong} overlong + {self.rejected} rejected + {self.skipped} bad records "
                       f"dropped ({(self.dropped_overlong + self.rejected + self.skipped) / n:.1%})")
        if self.end_of_turn is None:
            out.append("the template writes no end-of-turn special token: the model will not learn to stop")
        elif self.turns_with_end < self.labelled_turns - self.truncated:
            out.append(f"only {self.turns_with_end} of {self.labelled_turns} labelled turns end in a labelled "
                       f"{self.end_of_turn}")
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"{self.dataset} under {self.model} (strategy {self.strategy}, end of turn {self.end_of_turn}):",
            f"  records {self.records}, samples {self.samples}, tokens {self.tokens}, labelled "
            f"{self.labelled_tokens} ({self.labelled_share:.1%})",
            f"  no label {self.no_label}, dropped overlong {self.dropped_overlong}, truncated {self.truncated}, "
            f"bad records skipped {self.skipped}, rejected by template {self.rejected}",
            f"  labelled turns {self.labelled_turns}, ending in a labelled end-of-turn {self.turns_with_end}",
            f"  reasoning {self.reasoning}: kept in {self.reasoning_kept} turns, dropped in {self.reasoning_dropped}"
            + (f" (the template drops reasoning from earlier turns: kept as written in {self.reasoning_restored})"
               if self.reasoning_restored else ""),
            f"  length: max {self.max_len}; " + ", ".join(f"{k}: {v}" for k, v in self.length_histogram.items() if v),
        ]
        return "\n".join(lines)


def load_tokenizer(model: str, chat_template: str | None = None):
    """The tokenizer training would use: the model's (`tiny` built on demand), prepared with `chat_template`."""
    from transformers import AutoTokenizer

    from labkit.data import templates
    from labkit.tiny import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(model))
    if chat_template:
        templates.prepare(tok, chat_template)
    return tok


def histogram(lengths: list[int]) -> dict[str, int]:
    edges = [0, *BINS, np.iinfo(np.int64).max]
    counts = np.histogram(np.asarray(lengths, dtype=np.int64), bins=edges)[0] if lengths else [0] * (len(edges) - 1)
    names = [f"<={b}" for b in BINS] + [f">{BINS[-1]}"]
    return dict(zip(names, map(int, counts)))


def audit(dataset: str, model: str = "tiny", tokenizer=None, max_seq_len: int = 2048, overlong: str = "drop",
          chat_template: str | None = None, reasoning: str = "keep", train_on: str = "assistant",
          on_bad_record: str = "skip") -> tuple[Audit, list[TokenizedSample]]:
    """Audit the whole dataset; also returns the samples (for `sample_html`)."""
    from labkit.data import formats

    tok = tokenizer or load_tokenizer(model, chat_template)
    records, load = formats.read(dataset, on_error=on_bad_record)
    samples, rep = tokenize_records(records, tok, max_seq_len, overlong, source=str(dataset), reasoning=reasoning,
                                    train_on=train_on, on_error=on_bad_record)
    lengths = [len(s.input_ids) for s in samples]
    labelled = sum(sum(1 for x in s.labels if x != IGNORE) for s in samples)
    tokens = sum(lengths)
    return Audit(
        dataset=str(dataset), model=str(model), strategy=rep["strategy"], end_of_turn=rep["end_of_turn"],
        records=len(records) + load.skipped, samples=len(samples), tokens=tokens, labelled_tokens=labelled,
        labelled_share=labelled / tokens if tokens else 0.0, no_label=rep["no_loss_tokens"],
        dropped_overlong=rep["dropped_overlong"], truncated=rep["truncated"], skipped=load.skipped,
        rejected=rep["rejected"], labelled_turns=rep["labelled_turns"], turns_with_end=rep["turns_with_end"],
        reasoning=reasoning, reasoning_kept=rep["reasoning_kept"], reasoning_dropped=rep["reasoning_dropped"],
        reasoning_restored=rep["reasoning_restored"],
        length_histogram=histogram(lengths), max_len=max(lengths, default=0),
    ), samples


def sample_html(samples: list[TokenizedSample], tokenizer, n: int = 3) -> str:
    """A few samples as HTML, token by token: labelled (trained) tokens green, the rest grey."""
    rows = []
    for s in samples[:n]:
        spans = []
        for tid, lab in zip(s.input_ids, s.labels):
            text = html.escape(tokenizer.decode([tid])).replace("\n", "↵<br>")
            style = "background:#c8f7c5;color:#000" if lab != IGNORE else "background:#eee;color:#777"
            spans.append(f'<span style="{style}" title="{tid}">{text}</span>')
        rows.append('<div style="font-family:monospace;white-space:pre-wrap;border:1px solid #ccc;'
                    'padding:6px;margin:6px 0">' + "".join(spans) + "</div>")
    legend = ('<div><span style="background:#c8f7c5">trained (labelled)</span> '
              '<span style="background:#eee;color:#777">not trained</span></div>')
    return legend + "".join(rows)


def view(result: Audit, samples: list[TokenizedSample], tokenizer, n: int = 3):
    """The audit as text, its problems in red, and a coloured view of `n` samples (an IPython HTML object)."""
    from IPython.display import HTML

    problems = result.problems()
    head = f"<pre>{html.escape(str(result))}</pre>"
    if problems:
        head += "<pre style='color:#b00'>" + html.escape("\n".join(problems)) + "</pre>"
    return HTML(head + sample_html(samples, tokenizer, n))


def show(dataset: str, model: str = "tiny", n: int = 3, **kw: Any):
    """Notebook cell: audit `dataset` and `view` it."""
    tok = kw.pop("tokenizer", None) or load_tokenizer(model, kw.get("chat_template"))
    result, samples = audit(dataset, model, tokenizer=tok, **kw)
    return view(result, samples, tok, n)

