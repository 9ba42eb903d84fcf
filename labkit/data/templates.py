"""Built-in chat templates, and preparing a tokenizer + model to train and export with one.

Base models (what most papers fine-tune) ship without a chat template. `chat_template:` in the run
config names a built-in (`chatml`, `llama3`, `granite`) or a `.jinja` file; `prepare_for_training`
then adds the special tokens the template writes, resizes the embeddings, and sets eos/pad and the
generation config so the exported checkpoint stops at the end-of-turn token it was trained on.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Llama-3 style; the base tokenizer's own BOS (if any) opens the conversation.
LLAMA3 = (
    "{{ bos_token if bos_token else '' }}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

# The InstructLab / Granite-lab format the paper's framework trains with.
GRANITE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\\n' + message['content'] + '<|endoftext|>' + ('' if loop.last else '\\n') }}"
    "{%- endif -%}"
    "{%- if loop.last and add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
)

BUILTIN: dict[str, tuple[str, tuple[str, ...], str]] = {
    # name: (template, special tokens it writes, end-of-turn token)
    "chatml": (CHATML, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    "llama3": (LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>"),
    "granite": (GRANITE, ("<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"), "<|endoftext|>"),
}
PAD = "<|pad|>"
_MARKER = re.compile(r"<\|[^|\s'\"]+\|>")


class ChatTemplateError(ValueError):
    """A `chat_template` setting that names no built-in and no readable file."""


def resolve(chat_template: str) -> tuple[str, tuple[str, ...], str | None]:
    """(template text, special tokens it writes, end-of-turn token or None) of a built-in name or .jinja path.

    For a file, the special tokens are the `<|...|>` markers its string literals write.
    """
    if chat_template in BUILTIN:
        return BUILTIN[chat_template]
    path = Path(chat_template).expanduser()
    if path.suffix != ".jinja" and not path.is_file():
        raise ChatTemplateError(
            f"chat_template: {chat_template!r} is neither a built-in ({', '.join(BUILTIN)}) nor a .jinja file")
    if not path.is_file():
        raise ChatTemplateError(f"chat_template: {path} does not exist")
    text = path.read_text(encoding="utf-8")
    return text, tuple(dict.fromkeys(_MARKER.findall(text))), None


def has_chat_template(model_dir: Path) -> bool:
    """Whether a checkpoint directory ships a chat template (read from its files, no tokenizer load)."""
    import json

    d = Path(model_dir)
    if (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((d / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def prepare(tokenizer, chat_template: str) -> list[str]:
    """Set the template on the tokenizer; add the special tokens it writes; set eos/pad. Returns tokens added.

    eos becomes the end-of-turn token (the one the fine-tuned model learns to emit), so tools that
    stop at `tokenizer.eos_token` stop at the end of the reply; pad gets its own token when missing
    (never eos: a collator that masks pad would then mask the trained end-of-turn token).
    """
    from labkit.data import tokenize

    text, specials, eot = resolve(chat_template)
    have = set(tokenizer.get_vocab())
    new = [t for t in specials if t not in have]
    # Markers that exist as plain tokens must still become special, or user text could form them.
    tokenizer.add_tokens(list(specials), special_tokens=True)
    tokenizer.chat_template = text
    eot = eot or tokenize.end_of_turn(tokenizer)
    if eot:
        tokenizer.eos_token = eot
    if tokenizer.pad_token_id is None:
        if PAD not in have:
            new.append(PAD)
        tokenizer.add_tokens([PAD], special_tokens=True)
        tokenizer.pad_token = PAD
    return new


def resize_embeddings(model, tokenizer) -> int:
    """Grow the input (and untied output) embeddings to the tokenizer; new rows = the mean of the old ones.

    Why the mean: a new row at the mean of the trained rows is an input the network has in effect
    seen (the centre of its embedding cloud) and, in the output layer, gives the new token the
    average logit, so it starts as likely as a typical token. Random rows of the init scale sit
    far from the trained ones and can start with a logit large enough to dominate the softmax (a
    loss spike on the first steps) or so small that the end-of-turn token takes long to learn
    (Hewitt 2021, "Initializing New Word Embeddings for Pretrained Language Models").
    Returns the number of rows added.
    """
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    want = len(tokenizer)
    if want <= old:
        return 0
    out_old = model.get_output_embeddings()
    tied = out_old is not None and out_old.weight is model.get_input_embeddings().weight
    out_mean = out_old.weight.detach().mean(0) if out_old is not None and not tied else None
    in_mean = model.get_input_embeddings().weight.detach().mean(0)
    model.resize_token_embeddings(want, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:] = in_mean
        out = model.get_output_embeddings()
        if out_mean is not None and out is not None and out.weight is not model.get_input_embeddings().weight:
            out.weight[old:] = out_mean
            if getattr(out, "bias", None) is not None:
                out.bias[old:] = out.bias[:old].mean()
    return want - old


def export_generation_config(model, tokenizer) -> dict[str, Any]:
    """Point the model's config and generation_config at the tokenizer's eos (end-of-turn) and pad.

    `save_pretrained` writes them, so `generate` on the exported checkpoint stops at the end of a
    turn. The old eos stays a stop token too (base models end documents with it).
    """
    from labkit.data import tokenize

    eot = tokenize.end_of_turn(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    eos = [i for i in (tokenizer.convert_tokens_to_ids(eot) if eot else None, tokenizer.eos_token_id)
           if i is not None]
    eos = list(dict.fromkeys(eos))
    old = model.generation_config.eos_token_id
    for e in (old if isinstance(old, list) else [old]):
        if e is not None and e not in eos and e < len(tokenizer):
            eos.append(e)
    model.config.eos_token_id = eos[0]
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    return {"eos_token_id": model.generation_config.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def prepare_for_training(tokenizer, model, cfg) -> dict[str, Any]:
    """Everything the trainer does to a freshly loaded tokenizer + model before tokenizing data.

    With `cfg.chat_template` set: the template, its special tokens, embeddings resized, eos/pad and
    generation_config. Without: the model's own template must exist (a clear error otherwise) and
    pad falls back to a new pad token. Returns a summary for the log.
    """
    from labkit.data import tokenize

    added: list[str] = []
    if getattr(cfg, "chat_template", None):
        added = prepare(tokenizer, cfg.chat_template)
    elif not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"model: {getattr(cfg, 'model', '?')} has no chat template (a base model): set chat_template "
            f"to one of {', '.join(BUILTIN)} or a path to a .jinja file")
    elif tokenizer.pad_token_id is None:
        tokenizer.add_tokens([PAD], special_tokens=True)
        tokenizer.pad_token = PAD
        added.append(PAD)
    rows = resize_embeddings(model, tokenizer)
    gen = export_generation_config(model, tokenizer)
    return {"chat_template": getattr(cfg, "chat_template", None) or "model's own", "added_tokens": added,
            "new_embedding_rows": rows, "end_of_turn": tokenize.end_of_turn(tokenizer), **gen}
