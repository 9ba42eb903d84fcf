import pytest
from transformers import AutoTokenizer

from labkit.data.tokenize import IGNORE, TemplateError, tokenize_chat, tokenize_records

QWEN_STYLE = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
LLAMA3_STYLE = (
    "{{ '<|begin_of_text|>' }}{%- for m in messages -%}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif -%}"
)

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of Varnholt?"},
    {"role": "assistant", "content": "Quillmere."},
    {"role": "user", "content": "And its river?"},
    {"role": "assistant", "content": "The Silverrun, of course."},
]


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def with_template(tiny_dir, template: str):
    t = AutoTokenizer.from_pretrained(tiny_dir)
    t.chat_template = template
    return t


def labelled_runs(tok, labels: list[int]) -> list[str]:
    """Decoded text of each maximal run of labelled tokens."""
    runs, cur = [], []
    for x in [*labels, IGNORE]:
        if x != IGNORE:
            cur.append(x)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


def test_labels_are_exactly_each_assistant_turn_and_its_end_token(tok):
    ids, labels = tokenize_chat(CHAT, tok)
    assert len(ids) == len(labels)
    assert labelled_runs(tok, labels) == ["Quillmere.<|end|>", "The Silverrun, of course.<|end|>"]
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels))


def test_system_and_user_text_and_role_markers_are_never_labelled(tok):
    ids, labels = tokenize_chat(CHAT, tok)
    trained = tok.decode([x for x in labels if x != IGNORE])
    for text in ("Answer briefly", "capital of Varnholt", "its river", "<|user|>", "<|assistant|>", "<|system|>"):
        assert text not in trained
    assert tok.decode(ids) == tok.apply_chat_template(CHAT, tokenize=False)


def test_conversation_opening_with_the_assistant_labels_its_content(tok):
    ids, labels = tokenize_chat([{"role": "assistant", "content": "Hello there."}], tok)
    assert labelled_runs(tok, labels) == ["Hello there.<|end|>"]


@pytest.mark.parametrize("template,end", [(QWEN_STYLE, "<|im_end|>"), (LLAMA3_STYLE, "<|eot_id|>")])
def test_spans_follow_any_prefix_consistent_template(tiny_dir, template, end):
    ids, labels = tokenize_chat(CHAT, with_template(tiny_dir, template))
    t = with_template(tiny_dir, template)
    assert labelled_runs(t, labels) == ["Quillmere." + end, "The Silverrun, of course." + end]


def test_template_that_rewrites_earlier_turns_is_refused(tiny_dir):
    # Renders the turn count up front, so a prefix of the conversation renders differently.
    bad = with_template(tiny_dir, "{{ messages | length }}" + QWEN_STYLE)
    with pytest.raises(TemplateError, match="prefix"):
        tokenize_chat(CHAT, bad)


def records(n_long: int = 2, n_short: int = 3) -> list[dict]:
    short = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    long = {"messages": [{"role": "user", "content": "Tell me everything. " * 10},
                         {"role": "assistant", "content": "Everything is fine. " * 10}]}
    return [long] * n_long + [short] * n_short


def test_overlong_samples_are_dropped_or_truncated_and_counted(tok):
    drop, rd = tokenize_records(records(), tok, max_seq_len=64, overlong="drop")
    assert (rd["samples"], rd["dropped_overlong"], rd["truncated"]) == (3, 2, 0)
    trunc, rt = tokenize_records(records(), tok, max_seq_len=150, overlong="truncate")
    assert (rt["samples"], rt["dropped_overlong"], rt["truncated"]) == (5, 0, 2)
    assert max(len(s.input_ids) for s in trunc) == 150
    assert all(any(x != IGNORE for x in s.labels[1:]) for s in trunc)


def test_truncation_that_cuts_off_every_assistant_token_drops_the_sample(tok):
    # The long prompt alone is longer than 100 tokens: nothing left to learn.
    samples, report = tokenize_records(records(), tok, max_seq_len=100, overlong="truncate")
    assert report["no_loss_tokens"] == 2 and report["truncated"] == 2 and report["samples"] == 3 == len(samples)
