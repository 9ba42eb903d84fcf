"""Built-in chat templates: a base model trains with one and its export stops at the end of the turn."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from labkit.config import RunConfig
from labkit.data import templates
from labkit.data.collate import collate_padded
from labkit.data.tokenize import IGNORE, tokenize_chat, tokenize_records


def base(tiny_dir):
    """The tiny tokenizer and model as a base checkpoint: no chat template."""
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = None
    return tok, AutoModelForCausalLM.from_pretrained(tiny_dir)


@pytest.mark.parametrize("name", list(templates.BUILTIN))
def test_each_builtin_adds_its_tokens_and_labels_reply_and_end_of_turn(tiny_dir, name):
    tok, _ = base(tiny_dir)
    added = templates.prepare(tok, name)
    _, specials, eot = templates.BUILTIN[name]
    assert set(added) == {s for s in specials if s not in ("<|system|>", "<|user|>", "<|assistant|>")}
    assert tok.eos_token == eot and tok.pad_token_id is not None
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
            {"role": "assistant", "content": "Bye."}]
    ids, labels = tokenize_chat(msgs, tok)
    trained = [x for x in labels if x != IGNORE]
    assert tok.decode(trained) == f"Hello.{eot}Bye.{eot}"
    assert trained.count(tok.convert_tokens_to_ids(eot)) == 2


def test_new_embedding_rows_start_at_the_mean_of_the_old_ones_input_and_output():
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()

    class Tok:
        def __len__(self):
            return 67

    assert templates.resize_embeddings(model, Tok()) == 3
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_in.shape[0] == new_out.shape[0] == 67
    assert torch.allclose(new_in[64:], old_in.mean(0).expand(3, -1))
    assert torch.allclose(new_out[64:], old_out.mean(0).expand(3, -1))
    assert torch.equal(new_in[:64], old_in)


def test_base_model_without_a_template_is_refused_naming_the_setting(tiny_dir, tmp_path):
    tok, model = base(tiny_dir)
    with pytest.raises(templates.ChatTemplateError, match="has no chat template.*set chat_template"):
        templates.prepare_for_training(tok, model, SimpleNamespace(chat_template=None, model="base"))
    tok.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    problems = RunConfig(model=str(tmp_path), datasets=["knowledge"]).check()
    assert any("chat_template:" in p and "base model" in p for p in problems)
    assert RunConfig(model=str(tmp_path), datasets=["knowledge"], chat_template="chatml").check() == []
    assert any("neither a built-in" in p for p in
               RunConfig(model=str(tmp_path), datasets=["knowledge"], chat_template="chatlm").check())


def test_template_from_a_jinja_file_gets_its_markers_as_special_tokens(tiny_dir, tmp_path):
    tok, _ = base(tiny_dir)
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ '<|turn|>' + m['role'] + '\\n' + m['content'] + '<|stop|>' }}"
                    "{% endfor %}{% if add_generation_prompt %}{{ '<|turn|>assistant\\n' }}{% endif %}")
    assert templates.prepare(tok, str(path)) == ["<|turn|>", "<|stop|>"]
    assert tok.eos_token == "<|stop|>"


@pytest.mark.slow
def test_base_model_trained_with_chatml_exports_a_model_that_stops_at_the_end_of_turn(tiny_dir, tmp_path):
    torch.manual_seed(0)
    tok, model = base(tiny_dir)
    info = templates.prepare_for_training(tok, model, SimpleNamespace(chat_template="chatml", model="base"))
    assert info["end_of_turn"] == "<|im_end|>" and info["new_embedding_rows"] == 2
    conv = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello."}]
    samples, _ = tokenize_records([{"messages": conv}], tok, 128)
    batch = collate_padded(samples, tok.pad_token_id)
    batch.pop("num_loss_tokens")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.5
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    tok2, model2 = AutoTokenizer.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)
    eot = tok2.convert_tokens_to_ids("<|im_end|>")
    assert tok2.eos_token == "<|im_end|>" and eot in [model2.generation_config.eos_token_id] + list(
        model2.generation_config.eos_token_id if isinstance(model2.generation_config.eos_token_id, list) else [])
    prompt = tok2.apply_chat_template(conv[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model2.generate(**prompt, max_new_tokens=30, do_sample=False)[0, prompt["input_ids"].shape[1]:].tolist()
    assert out[-1] == eot and len(out) < 30  # stopped by itself, at the end-of-turn token
    assert "<|im_start|>" not in tok2.decode(out)  # it does not write the next turn either
