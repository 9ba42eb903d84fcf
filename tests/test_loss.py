"""The chunked linear cross-entropy equals transformers' own causal-LM loss, value and gradients."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from labkit import catalog
from labkit.data.collate import collate_packed, collate_padded
from labkit.data.tokenize import tokenize_records
from labkit.loss import chunked_loss, linear_cross_entropy, supports_chunked_loss


@pytest.fixture(scope="module")
def setup(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    samples, _ = tokenize_records(catalog.load("skills")[:6], tok, max_seq_len=256)
    return model, tok, samples


def loss_and_grads(model, batch, n_items):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, num_items_in_batch=n_items).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("collate", [collate_packed, collate_padded])
def test_chunked_loss_matches_transformers_loss_and_gradients(setup, collate):
    model, tok, samples = setup
    b = collate(samples, tok.pad_token_id)
    batch = {k: b[k] for k in ("input_ids", "position_ids", "attention_mask", "labels") if k in b}
    n_items = 3.0 * int((b["labels"][..., 1:] != -100).sum())  # as if other micro-batches shared the step
    want_loss, want = loss_and_grads(model, batch, n_items)
    chunked = copy.deepcopy(model)
    chunked_loss(chunked, chunk_tokens=7)  # many chunks, the last one ragged
    got_loss, got = loss_and_grads(chunked, batch, n_items)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)


def test_without_num_items_the_loss_is_the_mean_over_labelled_tokens(setup):
    model, tok, samples = setup
    b = collate_padded(samples, tok.pad_token_id)
    with torch.no_grad():
        hidden = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        want = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        got = linear_cross_entropy(hidden, model.lm_head.weight, b["labels"], chunk_tokens=5)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_a_micro_batch_without_labelled_tokens_gives_zero_loss_and_zero_gradients(setup):
    model, tok, samples = setup
    chunked = copy.deepcopy(model)
    chunked_loss(chunked, chunk_tokens=16)
    b = collate_packed(samples[:1], tok.pad_token_id)
    loss = chunked(input_ids=b["input_ids"], position_ids=b["position_ids"],
                   labels=torch.full_like(b["labels"], -100), num_items_in_batch=10.0).loss
    loss.backward()
    assert loss.item() == 0.0 and all(not p.grad.any() for p in chunked.parameters() if p.grad is not None)


def test_models_with_soft_capped_logits_keep_transformers_loss(setup):
    model = copy.deepcopy(setup[0])
    assert supports_chunked_loss(model) is None
    model.config.final_logit_softcapping = 30.0
    assert "soft-capped" in supports_chunked_loss(model)
