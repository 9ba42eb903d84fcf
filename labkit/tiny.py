"""A tiny Llama-architecture model and BPE tokenizer, built offline from the shipped data.

Nothing is downloaded: the tokenizer is trained with `tokenizers` on the chat files of the
datasets shipped with labkit (never a user's catalog: a user's broken or changed card must not
change or break the model every test and tutorial uses), the model is randomly initialised from a
fixed seed, and both are saved as an ordinary Hugging Face checkpoint directory. The trainer,
evaluation and notebooks then load it exactly like a user's real local checkpoint.

The cache entry is built once per node (`labkit.buildonce`): ranks starting together wait for
the first one, and an entry left incomplete by a killed build is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from labkit.buildonce import build_once

ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
END, PAD, BOS = "<|end|>", "<|pad|>", "<|bos|>"
SPECIAL_TOKENS = [PAD, BOS, END, *ROLE_TOKENS]

# Each turn is `<|role|>\n{content}<|end|>\n`; `<|end|>` is also EOS so generation stops at
# the end of the assistant's turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

# ~1.2M parameters: learns the shipped facts in a minute on two CPU cores.
MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    rope_theta=10000.0,
)
VOCAB_SIZE = 1024
BUILD_VERSION = 1


def home() -> Path:
    """Where labkit caches built artefacts: `$LABKIT_HOME`, else `.labkit/` at the project root."""
    if env := os.environ.get("LABKIT_HOME"):
        return Path(env)
    return Path(__file__).resolve().parent.parent / ".labkit"


SHIPPED_CATALOG = Path(__file__).resolve().parent.parent / "data_catalog"
SHIPPED_TRAINING_SETS = ("knowledge", "skills")


def _training_files() -> list[Path]:
    from labkit import catalog

    shipped = catalog.cards(SHIPPED_CATALOG)
    return sorted(shipped[name].path for name in SHIPPED_TRAINING_SETS)


def _fingerprint(files: list[Path], seed: int) -> str:
    h = hashlib.sha256(json.dumps([BUILD_VERSION, seed, VOCAB_SIZE, MODEL_SHAPE]).encode())
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _texts(files: list[Path]):
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            for m in json.loads(line)["messages"]:
                yield m["content"]


def build_tokenizer(files: list[Path], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE trained on the message texts, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(files), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _save(tmp: Path, seed: int, files: list[Path]) -> None:
    tokenizer = build_tokenizer(files)
    model = build_model(tokenizer, seed)
    tokenizer.save_pretrained(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "labkit_tiny.json").write_text(
        json.dumps({"seed": seed, "data": [str(f) for f in files], "params": model.num_parameters()})
    )


def build(out_dir: str | Path, seed: int = 0, files: list[Path] | None = None) -> Path:
    """Tokenizer and model in `out_dir`, built once (a complete existing entry is kept as is)."""
    out_dir = Path(out_dir)
    files = files or _training_files()
    build_once(out_dir, lambda tmp: _save(tmp, seed, files))
    return out_dir


def ensure_tiny(seed: int = 0) -> Path:
    """Path of the tiny checkpoint for the shipped data, building it on first use."""
    files = _training_files()
    return build(home() / f"tiny-{_fingerprint(files, seed)}", seed=seed, files=files)


def resolve_model(model: str) -> Path:
    """A config's `model` field as a checkpoint directory (`tiny` is built on demand)."""
    return ensure_tiny() if model == "tiny" else Path(model).expanduser()


if __name__ == "__main__":
    path = ensure_tiny()
    print(path)
