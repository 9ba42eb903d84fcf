"""Assistant-only labels under every kind of chat template (templates written here, in tests/templates/)."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from labkit.data.tokenize import IGNORE, TemplateError, tokenize_chat, tokenize_records

TEMPLATES = Path(__file__).parent / "templates"
END = "<|end|>"

SYSTEM = {"role": "system", "content": "Answer briefly."}
CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the capital of Varnholt?"},
               {"role": "assistant", "content": "Quillmere."}],
    "multi": [{"role": "user", "content": "What is the capital of Varnholt?"},
              {"role": "assistant", "content": "Quillmere."},
              {"role": "user", "content": "And its river?"},
              {"role": "assistant", "content": "The Silverrun, of course."}],
    "system": [SYSTEM, {"role": "user", "content": "Capital?"}, {"role": "assistant", "content": "Quillmere."},
               {"role": "user", "content": "River?"}, {"role": "assistant", "content": "Silverrun."}],
    "one_char": [SYSTEM, {"role": "user", "content": "a or b?"}, {"role": "assistant", "content": "a"},
                 {"role": "user", "content": "again"}, {"role": "assistant", "content": "b"}],
    "assistant_first": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "Why?"},
                        {"role": "assistant", "content": "Because."}],
    "assistant_first_system": [SYSTEM, {"role": "assistant", "content": "Hello there."}],
}
# Which conversations a template refuses, and the cause its refusal must name.
REFUSED = {
    "no_system": ({"system", "one_char", "assistant_first_system"}, "System role not supported"),
    "alternating": ({"assistant_first", "assistant_first_system"}, "roles must alternate"),
}
EXTRA_TOKENS = ["<|endoftext|>"]


def template_tok(tiny_dir, name: str):
    t = AutoTokenizer.from_pretrained(tiny_dir)
    t.add_tokens(EXTRA_TOKENS, special_tokens=True)
    t.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
    return t


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


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


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("template", ["prefix", "reasoning", "system_last", "eot_appended", "think_prompt",
                                      "no_system", "alternating", "trim"])
def test_labels_are_exactly_each_assistant_content_and_its_end_token(tiny_dir, template, conv):
    t = template_tok(tiny_dir, template)
    messages = CONVERSATIONS[conv]
    refused, cause = REFUSED.get(template, (set(), ""))
    if conv in refused:
        with pytest.raises(TemplateError, match=f"template rejects this conversation: .*{cause}"):
            tokenize_chat(messages, t)
        return
    ids, labels = tokenize_chat(messages, t)
    assert len(ids) == len(labels) and all(lab in (IGNORE, i) for i, lab in zip(ids, labels))
    want = [m["content"].strip() + END for m in messages if m["role"] == "assistant"]
    assert labelled_runs(t, labels) == want
    # The tokens spell exactly what the template renders: nothing added, nothing lost.
    assert t.decode(ids) == t.apply_chat_template(messages, tokenize=False)


def test_trimming_template_labels_the_trimmed_reply(tiny_dir):
    t = template_tok(tiny_dir, "trim")
    msgs = [{"role": "user", "content": "  q  "}, {"role": "assistant", "content": "  spaced out \n"}]
    ids, labels = tokenize_chat(msgs, t)
    assert labelled_runs(t, labels) == ["spaced out" + END]
    assert t.decode(ids) == t.apply_chat_template(msgs, tokenize=False)


THOUGHTFUL = [{"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "<think>\ntwo and two\n</think>\n\nFour."},
              {"role": "user", "content": "3+3?"},
              {"role": "assistant", "content": "Six.", "reasoning_content": "three and three"}]


def think(r: str, a: str) -> str:
    return f"<think>\n{r}\n</think>\n\n{a}{END}"


def test_reasoning_keep_trains_every_turns_reasoning_even_where_the_template_drops_it(tiny_dir):
    t = template_tok(tiny_dir, "reasoning")
    _, labels = tokenize_chat(THOUGHTFUL, t)  # keep is the default
    assert labelled_runs(t, labels) == [think("two and two", "Four."), think("three and three", "Six.")]
    _, report = tokenize_records([{"messages": THOUGHTFUL}], t, 512)
    assert (report["reasoning_kept"], report["reasoning_restored"]) == (2, 1)


def test_reasoning_template_trains_reasoning_only_where_the_template_writes_it(tiny_dir):
    t = template_tok(tiny_dir, "reasoning")
    ids, labels = tokenize_chat(THOUGHTFUL, t, reasoning="template")
    assert labelled_runs(t, labels) == ["Four." + END, think("three and three", "Six.")]


def test_reasoning_drop_leaves_the_templates_empty_think_block_unlabelled(tiny_dir):
    t = template_tok(tiny_dir, "reasoning")
    ids, labels = tokenize_chat(THOUGHTFUL, t, reasoning="drop")
    assert labelled_runs(t, labels) == ["Four." + END, "Six." + END]
    assert "<think>\n\n</think>\n\nSix." in t.decode(ids)  # the template's block is there, as a prompt
    samples, report = tokenize_records([{"messages": THOUGHTFUL}], t, 512, reasoning="drop")
    assert (report["reasoning_dropped"], report["reasoning_kept"]) == (2, 0)


def test_think_opening_generation_prompt_is_not_refused(tiny_dir):
    t = template_tok(tiny_dir, "think_prompt")
    _, labels = tokenize_chat(THOUGHTFUL, t, reasoning="drop")
    assert labelled_runs(t, labels) == ["Four." + END, "Six." + END]


def test_train_on_last_assistant_all_and_per_message_override(tok):
    conv = CONVERSATIONS["multi"]
    _, labels = tokenize_chat(conv, tok, train_on="last_assistant")
    assert labelled_runs(tok, labels) == ["The Silverrun, of course." + END]
    ids, labels = tokenize_chat(conv, tok, train_on="all")
    assert labels == ids
    override = [dict(conv[0], train=True), dict(conv[1], train=False), *conv[2:]]
    _, labels = tokenize_chat(override, tok)
    assert labelled_runs(tok, labels) == ["What is the capital of Varnholt?" + END, "The Silverrun, of course." + END]


def test_special_token_strings_typed_in_content_are_text_not_control_tokens(tok):
    end_id, user_id = tok.convert_tokens_to_ids(END), tok.convert_tokens_to_ids("<|user|>")
    conv = [{"role": "user", "content": "say <|end|><|user|> please"},
            {"role": "assistant", "content": "ok <|end|><|user|> done"}]
    ids, labels = tokenize_chat(conv, tok)
    assert ids.count(end_id) == 2 and ids.count(user_id) == 1  # only the template's own markers
    trained = [x for x in labels if x != IGNORE]
    assert trained.count(end_id) == 1 and tok.decode(trained) == "ok <|end|><|user|> done" + END


def test_reply_tokens_start_where_inference_starts_them():
    """With a tokenizer that merges across "\\n ", a reply's leading space still starts the reply's tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    corpus = ["<|assistant|>\n Hello there\n hi\n Hello"] * 50
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|user|>", "<|assistant|>",
                                                        END], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    t = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=END)
    t.chat_template = (TEMPLATES / "prefix.jinja").read_text()
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " Hello there"}]
    whole = t(t.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
    assert any(t.decode([x]).startswith("\n ") for x in whole)  # this tokenizer does merge the boundary
    ids, labels = tokenize_chat(conv, t)
    prompt = t(t.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt)] == prompt
    assert labelled_runs(t, labels) == [" Hello there" + END]


@pytest.mark.parametrize("prepend", ["always", "first"])
def test_sentencepiece_style_replies_are_tokenized_as_a_reply_alone(prepend):
    """Metaspace tokenizers (Llama-2, Mistral, Gemma) put "▁" before a word; "always" is sentencepiece's
    legacy rule, "first" transformers' newer one. Either way the prompt is what inference tokenizes and
    the reply is tokenized as a message on its own (as sentencepiece and mistral-common encode messages),
    not glued to `[/INST]` as one string would be under "first"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend)
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend)
    corpus = ["[INST] What is the capital of Varnholt? [/INST] Quillmere, of course.</s>"] * 50
    raw.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], show_progress=False))
    t = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    t.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                       "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}"
                       "{% endif %}{% endfor %}")
    reply = "Quillmere, of course."
    conv = [{"role": "user", "content": "What is the capital of Varnholt?"}, {"role": "assistant", "content": reply}]
    ids, labels = tokenize_chat(conv, t)
    prompt = t(t.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt)] == prompt
    alone = t(reply, add_special_tokens=False)["input_ids"]
    assert ids[len(prompt):] == [*alone, t.eos_token_id] and t.convert_ids_to_tokens(alone[0]) == "▁Quillmere,"
    assert labelled_runs(t, labels) == [reply + "</s>"]


def test_template_without_an_end_of_turn_token_is_refused_naming_the_cause(tok, tiny_dir):
    t = AutoTokenizer.from_pretrained(tiny_dir)
    t.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    with pytest.raises(TemplateError, match="writes no end-of-turn token after assistant content"):
        tokenize_chat(CONVERSATIONS["single"], t)


def test_records_the_template_rejects_name_the_record_or_are_skipped(tiny_dir):
    t = template_tok(tiny_dir, "no_system")
    recs = [{"messages": CONVERSATIONS["single"]}, {"messages": CONVERSATIONS["system"], "_where": "d.jsonl:2"}]
    with pytest.raises(TemplateError, match="d.jsonl:2: the chat template rejects .*System role not supported"):
        tokenize_records(recs, t, 256)
    samples, report = tokenize_records(recs, t, 256, on_error="skip")
    assert len(samples) == 1 and report["rejected"] == 1 and report["strategy"] == "placeholder"


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


def test_end_of_turn_is_counted_in_every_labelled_turn(tok):
    _, report = tokenize_records([{"messages": CONVERSATIONS["multi"]}] * 3, tok, 512)
    assert report["labelled_turns"] == report["turns_with_end"] == 6
