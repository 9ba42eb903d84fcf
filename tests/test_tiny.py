import json
import os
import subprocess
import sys
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from labkit import tiny


def test_tiny_checkpoint_loads_with_plain_transformers(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.model_type == "llama"
    assert 1e6 <= model.num_parameters() <= 3e6
    assert (tiny_dir / "model.safetensors").is_file()
    assert model.config.vocab_size == len(tok)


def test_chat_template_renders_every_role_and_ends_turns(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 2 + 3?<|end|>\n<|assistant|>\n5<|end|>\n"
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n") and text.startswith(prompt)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for special in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert tok.convert_tokens_to_ids(special) in ids
    assert tok.eos_token == "<|end|>"
    assert tok.decode(ids) == text


def test_build_is_deterministic_for_a_seed(tmp_path):
    a = tiny.build(tmp_path / "a", seed=3)
    b = tiny.build(tmp_path / "b", seed=3)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((a / "labkit_tiny.json").read_text())["seed"] == 3


def test_ensure_tiny_is_cached(tiny_dir):
    mtime = (tiny_dir / "config.json").stat().st_mtime
    assert tiny.ensure_tiny() == tiny_dir
    assert (tiny_dir / "config.json").stat().st_mtime == mtime


def test_poisoned_cache_entry_is_detected_and_rebuilt(tiny_dir, tmp_path, monkeypatch):
    # What a 2-process start on a fresh checkout used to leave: tokenizer files, no config or weights.
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    entry = tmp_path / tiny_dir.name
    entry.mkdir()
    for f in tiny_dir.glob("tokenizer*"):
        (entry / f.name).write_bytes(f.read_bytes())
    assert tiny.ensure_tiny() == entry
    assert AutoModelForCausalLM.from_pretrained(entry).num_parameters() > 1e6
    assert (entry / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()


def test_users_broken_catalog_card_does_not_touch_the_tiny_model(tiny_dir, tmp_path, monkeypatch):
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    (tmp_path / "mine.yaml").write_text("name: mine\npath: missing.jsonl\nkind: skills\n")
    monkeypatch.setenv("LABKIT_CATALOG", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert tiny.ensure_tiny() == tiny_dir


RACER = """
import sys, time
from pathlib import Path
go = Path(sys.argv[1])
from labkit.tiny import ensure_tiny
while not go.exists():
    time.sleep(0.005)
print(ensure_tiny())
"""


def test_two_processes_starting_on_a_fresh_home_share_one_tiny_build(tiny_dir, tmp_path):
    # The 2-process start that used to fail with "OSError: Directory not empty: .tmp-tiny-... -> tiny-...".
    env = {**os.environ, "LABKIT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(Path(tiny.__file__).parent.parent)}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "go")], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    time.sleep(0.5)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0].strip() == outs[1][0].strip() == str(tmp_path / "home" / tiny_dir.name)
    assert sorted(p.name for p in (tmp_path / "home").iterdir() if not p.name.endswith(".lock")) == [tiny_dir.name]
