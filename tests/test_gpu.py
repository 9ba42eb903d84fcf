"""What only a CUDA device can show: the varlen kernel, bf16 packed losses, data parallelism on GPUs.

Skipped on CPU (conftest skips every `gpu` test without CUDA); `bench/device_check.sh` runs them first
on a lent device.
"""

import json
import math

import pytest
import torch

from labkit import attention, catalog

pytestmark = pytest.mark.gpu

# bf16 keeps 8 bits of mantissa: one rounding of an O(1) attention output is ~4e-3; the kernels sum in
# different orders, so a few roundings apart is what agreement means here.
BF16_ATOL = 2e-2


def _varlen(q, k, v, lengths):
    """labkit's varlen forward on one packed row: q/k/v as transformers hands them, (1, heads, T, dim)."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=q.device)
    out, _ = attention._varlen_forward(None, q, k, v, None, scaling=q.shape[-1] ** -0.5,
                                       cu_seq_lens_q=cu, max_length_q=max(lengths))
    return out[0]  # (T, heads, dim)


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (32, 8)])
def test_varlen_attention_equals_causal_sdpa_per_sequence_in_bf16(heads, kv_heads):
    torch.manual_seed(0)
    lengths = [1, 7, 64, 300, 1025]
    t, d = sum(lengths), 64
    q = torch.randn(1, heads, t, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, t, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, kv_heads, t, d, device="cuda", dtype=torch.bfloat16)
    packed = _varlen(q, k, v, lengths)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True, enable_gqa=heads != kv_heads)
        torch.testing.assert_close(packed[sl], ref[0].transpose(0, 1), atol=BF16_ATOL, rtol=BF16_ATOL)
        start += n


def test_varlen_attention_takes_fp32_queries_under_autocast():
    # fp32 master weights under bf16 autocast hand fp32 q/k (RoPE promotes them) and bf16 v.
    torch.manual_seed(0)
    q = torch.randn(1, 4, 40, 32, device="cuda")
    k = torch.randn(1, 2, 40, 32, device="cuda")
    v = torch.randn(1, 2, 40, 32, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = _varlen(q, k, v, [10, 30])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def _token_loss_sum(model, batch) -> float:
    from labkit.loss import supports_chunked_loss

    kw = {k: batch[k].cuda() for k in ("input_ids", "position_ids", "labels")}
    if attention.needs_cu_seqlens(model.config._attn_implementation):
        cu = batch["cu_seqlens"].cuda()
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch["max_seqlen"],
                  max_length_k=batch["max_seqlen"])
    n = int(batch["num_loss_tokens"])
    assert supports_chunked_loss(model) is None
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        return float(model(**kw, num_items_in_batch=n).loss) * n


def test_packed_bf16_loss_equals_the_samples_one_by_one(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from labkit.data.collate import collate_packed
    from labkit.data.tokenize import tokenize_records
    from labkit.loss import chunked_loss

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    samples, _ = tokenize_records(catalog.load("skills")[:16], tok, max_seq_len=256)
    impl = attention.choose("auto", packing=True, device=torch.device("cuda"))
    assert attention.needs_cu_seqlens(impl), f"no varlen kernel on this CUDA device (chose {impl})"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=impl, dtype=torch.float32).cuda()
    model.config.use_cache = False
    chunked_loss(model, 256)
    packed = _token_loss_sum(model, collate_packed(samples, tok.pad_token_id))
    alone = sum(_token_loss_sum(model, collate_packed([s], tok.pad_token_id)) for s in samples)
    assert packed == pytest.approx(alone, rel=1e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpu_ddp_matches_one_gpu_step_for_step(tmp_path):
    from labkit.config import RunConfig
    from labkit.launch import launch

    base = dict(model="tiny", datasets=["skills"], effective_batch_size=32, max_tokens_per_device=2048,
                max_seq_len=256, max_steps=4, seed=3, runs_root=str(tmp_path), save_final=False,
                distributed={"mixed_precision": "no"})
    runs = {}
    for n in (1, 2):
        cfg = RunConfig(name=f"gpus{n}", **{**base, "distributed": {**base["distributed"], "num_processes": n}})
        runs[n] = launch(cfg)
    rows = {}
    for n, run in runs.items():
        assert run.wait(timeout=600)["state"] == "finished", run.tail(40)
        rows[n] = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    for one, two in zip(rows[1], rows[2], strict=True):
        # fp32 on both; only the order of the cross-rank sum differs.
        assert math.isclose(one["loss"], two["loss"], rel_tol=1e-4)
        assert math.isclose(one["grad_norm"], two["grad_norm"], rel_tol=1e-3)
