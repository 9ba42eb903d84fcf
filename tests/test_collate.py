import torch
from transformers import AutoTokenizer

from labkit.data.collate import collate_packed, collate_padded
from labkit.data.tokenize import IGNORE, TokenizedSample, tokenize_records

PAD = 0
A = TokenizedSample([11, 12, 13], [IGNORE, 12, 13])
# A sample whose first token carries a label, as a truncated or hand-made sample might.
B = TokenizedSample([21, 22], [21, 22])


def test_packed_row_restarts_positions_and_marks_sample_boundaries():
    b = collate_packed([A, B], PAD)
    assert b["input_ids"].tolist() == [[11, 12, 13, 21, 22]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["cu_seqlens"].tolist() == [0, 3, 5] and b["cu_seqlens"].dtype == torch.int32
    assert b["max_seqlen"] == 3


def test_first_label_of_every_packed_sample_is_ignored():
    # Otherwise the last token of A would be trained to predict the first token of B.
    b = collate_packed([A, B], PAD)
    assert b["labels"].tolist() == [[IGNORE, 12, 13, IGNORE, 22]]
    assert int(b["num_loss_tokens"]) == 3


def test_empty_micro_batch_becomes_a_pad_row_without_loss():
    for collate in (collate_packed, collate_padded):
        b = collate([], PAD)
        assert b["input_ids"].shape[-1] >= 1 and (b["input_ids"] == PAD).all()
        assert (b["labels"] == IGNORE).all() and int(b["num_loss_tokens"]) == 0
    assert collate_packed([], PAD)["cu_seqlens"].tolist() == [0, 2]


def test_padded_batch_is_right_padded_with_mask_and_ignored_labels():
    b = collate_padded([A, B], PAD)
    assert b["input_ids"].tolist() == [[11, 12, 13], [21, 22, PAD]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[IGNORE, 12, 13], [21, 22, IGNORE]]
    assert int(b["num_loss_tokens"]) == 3  # the model never predicts a row's first token


def test_packed_and_padded_count_the_same_loss_tokens_for_real_chats(tiny_dir):
    from labkit import catalog

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    samples, _ = tokenize_records(catalog.load("skills")[:8], tok, max_seq_len=512)
    packed, padded = collate_packed(samples, tok.pad_token_id), collate_padded(samples, tok.pad_token_id)
    assert packed["input_ids"].shape[1] == int(padded["attention_mask"].sum())
    assert int(packed["num_loss_tokens"]) == int(padded["num_loss_tokens"]) == sum(
        sum(x != IGNORE for x in s.labels[1:]) for s in samples)
