"""The seq2seq decoder: loss, greedy = beam 1, closed-set constraints, learning a tiny mapping."""

from __future__ import annotations

import pytest
import torch

from one_peace.models.seq2seq import EOS, PAD, Seq2SeqConfig, TextDecoder, Trie, generate, seq2seq_loss, shift_right

pytestmark = pytest.mark.core


def _decoder(seed=0):
    torch.manual_seed(seed)
    return TextDecoder(Seq2SeqConfig(vocab_size=20, encoder_dim=8, embed_dim=16, layers=2, heads=2, ffn_dim=32))


def test_beam_one_equals_greedy():
    dec = _decoder().eval()
    mem = torch.randn(3, 5, 8)
    greedy = []
    for i in range(3):  # a hand-written greedy loop as the reference
        seq = []
        for _ in range(10):
            logits = dec(torch.tensor([[0, *seq]]), mem[i : i + 1])
            tok = int(logits[0, -1].argmax())
            seq.append(tok)
            if tok == EOS:
                break
        greedy.append(seq if seq[-1] == EOS else [*seq, EOS])
    assert generate(dec, mem, beam=1, max_len=10) == greedy


def test_constrained_decoding_only_emits_members():
    dec = _decoder(1).eval()
    allowed = [[5, 6, EOS], [5, 7, 8, EOS], [9, EOS]]
    trie = Trie(allowed)
    out = generate(dec, torch.randn(6, 4, 8), beam=3, max_len=8, trie=trie)
    assert all(seq in allowed for seq in out)
    out1 = generate(dec, torch.randn(4, 4, 8), beam=1, max_len=8, trie=trie)
    assert all(seq in allowed for seq in out1)


def test_decoder_learns_a_memory_dependent_mapping():
    dec = _decoder(2)
    mem = torch.randn(4, 3, 8)
    target = torch.tensor([[3, 4, EOS, PAD], [5, EOS, PAD, PAD], [6, 7, 8, EOS], [9, EOS, PAD, PAD]])
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    for _ in range(150):
        loss = seq2seq_loss(dec(shift_right(target), mem), target, label_smoothing=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    got = generate(dec.eval(), mem, beam=2, max_len=6)
    assert got == [[3, 4, EOS], [5, EOS], [6, 7, 8, EOS], [9, EOS]]
    # padded memory positions are ignored
    pad = torch.tensor([[False, False, True]] * 4)
    noisy = mem.clone()
    noisy[:, 2] = 100.0
    torch.testing.assert_close(
        dec(shift_right(target), noisy, pad), dec(shift_right(target), mem[:, :2]), atol=1e-5, rtol=1e-5
    )
