"""The pretraining decoder (parity README §5): official decoder outputs from the student encoder on kept tokens."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import one_peace
from one_peace.checkpoint.pretrain import decoder_from_official_state

pytestmark = pytest.mark.core

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def setup(official_tiny, parity):
    model = one_peace.load(official_tiny)
    model.official_padding = True
    extra = load_file(str(parity / "one_peace_tiny_pretrain_extra_state.safetensors"))
    decoder = decoder_from_official_state(extra, model.config.embed_dim, heads=4, source="pretrain extra state")
    decoder.official_padding = True
    io = load_file(str(parity / "one_peace_tiny_io.safetensors"))
    pre = load_file(str(parity / "one_peace_tiny_pretrain_io.safetensors"))
    return model, decoder.eval(), io, pre


def _inputs(io, prefix):
    return {
        "text": {"tokens": io[f"in.{prefix if prefix in ('vl', 'al') else 'text'}.src_tokens"]},
        "image": {"pixels": io["in.image.src_images"]},
        "audio": {"waveform": io["in.audio.src_audios"], "padding_mask": io["in.audio.audio_padding_masks"]},
    }


@torch.no_grad()
@pytest.mark.parametrize("case", ["text", "image", "audio", "vl", "al"])
def test_decoder_reproduces_official_outputs(setup, case):
    model, decoder, io, pre = setup
    mods = {"vl": ("text", "image"), "al": ("text", "audio")}.get(case, (case,))
    inputs = {m: _inputs(io, case)[m] for m in mods}
    keep = {m: pre[f"in.{case}.{m}_preserve_ids"] for m in mods}
    full = model.forward_features(inputs)  # full lengths and padding of the unmasked input
    student = model.forward_features(inputs, keep_ids=keep)
    out = decoder(
        {m: student.hidden[m] for m in mods},
        keep,
        {m: full.padding_mask[m] for m in mods},
        {m: full.hidden[m].shape[1] for m in mods},
    )
    for m in mods:
        key = f"out.{case}.{m}_decoder_out" if len(mods) > 1 else f"out.{case}.decoder_out"
        torch.testing.assert_close(out[m], pre[key], **TOL)


def test_decoder_state_errors_name_the_key(parity):
    extra = load_file(str(parity / "one_peace_tiny_pretrain_extra_state.safetensors"))
    extra["text_mask_head.weight"] = torch.zeros(64, 16)
    with pytest.raises(ValueError, match=r"ckpt: key 'text_mask_head\.weight' has shape \(64, 16\)"):
        decoder_from_official_state(extra, 64, heads=4, source="ckpt")
    with pytest.raises(ValueError, match="pass heads="):
        decoder_from_official_state(load_file(str(parity / "one_peace_tiny_pretrain_extra_state.safetensors")), 64)
