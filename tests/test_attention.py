import pytest
import torch
from transformers import AutoModelForCausalLM

from labkit import attention, catalog
from labkit.data.collate import collate_packed, collate_padded
from labkit.data.tokenize import tokenize_records


def test_cpu_packing_uses_sdpa_with_block_diagonal_masking():
    assert attention.choose("auto", packing=True, device=torch.device("cpu")) == "sdpa"


def test_varlen_on_cpu_is_refused_with_advice():
    with pytest.raises(ValueError, match="'varlen' needs a CUDA device"):
        attention.choose("varlen", packing=True, device=torch.device("cpu"))


def _packed_vs_padded(tiny_dir, impl: str, device: str, dtype=torch.bfloat16):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    samples, _ = tokenize_records(catalog.load("skills")[:8], tok, max_seq_len=256)
    padded_model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa", dtype=dtype).to(device)
    packed_model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=impl, dtype=dtype).to(device)
    for m in (padded_model, packed_model):
        m.config.use_cache = False
    p = collate_packed(samples, tok.pad_token_id)
    kw = {"input_ids": p["input_ids"].to(device), "position_ids": p["position_ids"].to(device)}
    if attention.needs_cu_seqlens(impl):
        cu = p["cu_seqlens"].to(device)
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=p["max_seqlen"], max_length_k=p["max_seqlen"])
    packed = packed_model(**kw).logits[0]
    b = collate_padded(samples, tok.pad_token_id)
    padded = padded_model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
    rows = torch.cat([padded[i, : len(s.input_ids)] for i, s in enumerate(samples)])
    return packed.float(), rows.float()


def test_sdpa_packed_rows_equal_padded_batches_on_cpu(tiny_dir):
    packed, padded = _packed_vs_padded(tiny_dir, "sdpa", "cpu", dtype=torch.float32)
    assert torch.allclose(packed, padded, atol=1e-4)


@pytest.mark.gpu
def test_torch_varlen_attention_equals_padded_attention(tiny_dir):
    impl = attention.choose("varlen", packing=True, device=torch.device("cuda"))
    packed, padded = _packed_vs_padded(tiny_dir, impl, "cuda")
    assert torch.allclose(packed, padded, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
def test_flash_attention_2_equals_padded_attention(tiny_dir):
    pytest.importorskip("flash_attn")
    packed, padded = _packed_vs_padded(tiny_dir, "flash_attention_2", "cuda")
    assert torch.allclose(packed, padded, atol=3e-2, rtol=3e-2)
