"""Official ONE-PEACE parity (parity README §1-§4, §5 student encoder, §6, §7 key layout, §9, §11).

The tiny official weights are wrapped into an official-style fairseq file and loaded through
``one_peace.load``; every stored output is compared with the tolerance the parity README recommends.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import one_peace
from one_peace.checkpoint.official import IGNORED, infer_config, is_ignored, map_official_key
from one_peace.models.relpos import bucket_1d, bucket_2d

pytestmark = pytest.mark.core

FEAT = {"atol": 1e-5, "rtol": 0}
HIDDEN = {"atol": 5e-5, "rtol": 1e-5}
PRE = {"atol": 1e-6, "rtol": 0}
SENTENCES = [
    "a dog.",
    "A photo of a cat sitting on a red sofa, next to an open window.",
    "Two people ride bicycles along the beach at sunset while a small brown dog runs beside them and seagulls fly "
    "overhead; the sky is orange and purple.",
]


@pytest.fixture(scope="module")
def model(official_tiny: Path, parity: Path):
    return one_peace.load(official_tiny, bpe_dir=parity / "bpe")


def _check_pass(model, io, inputs, prefix, names):
    out = model.forward_features(inputs, return_layer_states=True)
    for m in inputs:
        key = f"out.{prefix}.{m}_last_hidden" if len(inputs) > 1 else f"out.{prefix}.last_hidden"
        torch.testing.assert_close(out.hidden[m], io[key], **HIDDEN)
        mask = out.padding_mask[m]
        ref_mask = io[key.replace("last_hidden", "padding_mask")]
        assert torch.equal(mask if mask is not None else torch.zeros_like(ref_mask), ref_mask)
        for i in range(2):
            dbg = f"dbg.{prefix}.{m}_layer{i}_out" if len(inputs) > 1 else f"dbg.{prefix}.layer{i}_out"
            torch.testing.assert_close(out.layer_states[i][m], io[dbg], **HIDDEN)
    return out


@contextlib.contextmanager
def official_padding(model):
    """The module-scoped model with official padding on, restored even when an assertion fails."""
    model.official_padding = True
    try:
        yield model
    finally:
        model.official_padding = False


@torch.no_grad()
def test_unimodal_passes_features_hidden_and_layers(model, parity_io):
    io = parity_io
    with official_padding(model):  # the official batch of two audio clips leaks padding (README §3)
        for m, batch in (
            ("text", {"tokens": io["in.text.src_tokens"]}),
            ("image", {"pixels": io["in.image.src_images"]}),
            ("audio", {"waveform": io["in.audio.src_audios"], "padding_mask": io["in.audio.audio_padding_masks"]}),
        ):
            out = _check_pass(model, io, {m: batch}, m, [m])
            torch.testing.assert_close(out.adapter_states[m], io[f"dbg.{m}.adapter_out"], **HIDDEN)
            torch.testing.assert_close(model.embed(m, out.hidden[m]), io[f"out.{m}.features"], **FEAT)
        adapters = model.adapters
        torch.testing.assert_close(
            adapters["image"].patch_tokens(io["in.image.src_images"])[0], io["dbg.image.stem_out"], **PRE
        )
        f = adapters["audio"].feature_extractor(io["in.audio.src_audios"])
        torch.testing.assert_close(f, io["dbg.audio.feature_extractor_out"], **HIDDEN)
        torch.testing.assert_close(adapters["audio"].positions(f, None), io["dbg.audio.conv_pos_out"], **HIDDEN)
        torch.testing.assert_close(model.logit_scale.exp().clamp(max=100).reshape(1), io["out.logit_scale_exp"])


@torch.no_grad()
def test_fused_vl_and_al_passes(model, parity_io):
    io = parity_io
    _check_pass(
        model,
        io,
        {"text": {"tokens": io["in.vl.src_tokens"]}, "image": {"pixels": io["in.image.src_images"]}},
        "vl",
        [],
    )
    with official_padding(model):
        audio = {"waveform": io["in.audio.src_audios"], "padding_mask": io["in.audio.audio_padding_masks"]}
        _check_pass(model, io, {"text": {"tokens": io["in.al.src_tokens"]}, "audio": audio}, "al", [])


@torch.no_grad()
def test_end_to_end_from_raw_inputs(model, parity, parity_io):
    io = parity_io
    img = model.encode("image", [parity / "parity_image.png", parity / "parity_image_small.png"])
    torch.testing.assert_close(img, io["out.image.features"], **FEAT)
    assert torch.equal(model.prepare("text", SENTENCES)["tokens"], io["in.text.src_tokens"])
    torch.testing.assert_close(model.encode("text", SENTENCES), io["out.text.features"], **FEAT)
    with official_padding(model):
        aud = model.encode("audio", [str(parity / "io_audio_1.wav"), str(parity / "io_audio_2.wav")])
    torch.testing.assert_close(aud, io["out.audio.features"], **FEAT)


@torch.no_grad()
def test_student_encoder_with_kept_tokens(model, parity):
    """§5: the encoder on visible tokens only (keep_ids = official preserve_ids)."""
    io = load_file(str(parity / "one_peace_tiny_io.safetensors"))
    pre = load_file(str(parity / "one_peace_tiny_pretrain_io.safetensors"))
    with official_padding(model):
        cases = {
            "text": {"tokens": io["in.text.src_tokens"]},
            "image": {"pixels": io["in.image.src_images"]},
            "audio": {"waveform": io["in.audio.src_audios"], "padding_mask": io["in.audio.audio_padding_masks"]},
        }
        for m, batch in cases.items():
            keep = pre[f"in.{m}.{m}_preserve_ids"]
            out = model.forward_features({m: batch}, keep_ids={m: keep})
            valid = keep.ne(-1)
            torch.testing.assert_close(out.hidden[m][valid], pre[f"dbg.{m}.encoder_out_kept"][valid], **HIDDEN)


def test_preprocessing_matches_official(model, parity):
    ref = load_file(str(parity / "preprocess_io.safetensors"))
    image = model.plugins["image"].build_preprocessor(model.config)
    for name in ("parity_image.png", "parity_image_small.png"):
        key = "image_" + name.replace(".", "_")
        torch.testing.assert_close(image(parity / name)["pixels"], ref[key], **PRE)
    audio = model.plugins["audio"].build_preprocessor(model.config)
    from one_peace.adapters.audio import load_audio

    for name, tol in (
        ("parity_audio_16k.wav", PRE),
        ("parity_audio_44k_stereo.wav", {"atol": 1e-5, "rtol": 0}),
        ("parity_audio_short_16k.wav", PRE),
    ):
        key = name.replace(".", "_")
        out = audio(parity / name)
        torch.testing.assert_close(out["waveform"], ref[f"wave_{key}"], **tol)
        assert torch.equal(out["padding_mask"], ref[f"padding_mask_{key}"])
        if f"raw_librosa_load_{key}" in ref:
            import numpy as np
            import soxr

            data, sr = load_audio(parity / name)
            mono = data.mean(axis=1, dtype=np.float32) if data.ndim == 2 else data
            raw = soxr.resample(mono, sr, 16000, quality="HQ") if sr != 16000 else mono
            torch.testing.assert_close(
                torch.from_numpy(np.asarray(raw, dtype=np.float32)), ref[f"raw_librosa_load_{key}"], **tol
            )
    batch = model.plugins["audio"].collate(
        [audio(parity / "parity_audio_16k.wav"), audio(parity / "parity_audio_short_16k.wav")]
    )
    torch.testing.assert_close(batch["waveform"], ref["batch_waves_16k_then_short"], **PRE)
    assert torch.equal(batch["padding_mask"], ref["batch_padding_masks_16k_then_short"])


def test_tokenisation_matches_official_ids(model, parity):
    doc = json.loads((parity / "text_tokenize.json").read_text())
    for s in doc["sentences"]:
        assert model.tokenizer.encode(s["text"]) == s["ids"], s["text"]
    batch = model.prepare("text", [s["text"] for s in doc["sentences"]])["tokens"]
    assert batch.tolist() == doc["batch_ids"]
    assert model.tokenizer.encode("") == [1437, 2]


def test_relative_position_buckets_match_official_buffers(parity):
    state = load_file(str(parity / "one_peace_tiny_state.safetensors"))
    assert torch.equal(bucket_1d(1024, 256), state["encoder_wrapper.text_adapter.rp_bucket"].long())
    assert torch.equal(bucket_1d(1024, 512), state["encoder_wrapper.audio_adapter.rp_bucket"].long())
    assert torch.equal(bucket_2d(16, 16, 16), state["encoder_wrapper.image_adapter.rp_bucket"].long())
    delta = load_file(str(parity / "one_peace_tiny_retrieval384_state_delta.safetensors"))
    assert torch.equal(bucket_2d(24, 24, 24), delta["encoder_wrapper.image_adapter.rp_bucket"].long())


@torch.no_grad()
def test_384px_images_on_256px_weights(official_tiny, parity):
    """§9: run-time pos_embed resize and load-time relative-table interpolation."""
    model = one_peace.load(official_tiny, image_size=384)
    delta = load_file(str(parity / "one_peace_tiny_retrieval384_state_delta.safetensors"))
    io = load_file(str(parity / "one_peace_tiny_384_io.safetensors"))
    torch.testing.assert_close(
        model.adapters["image"].rel_pos_table, delta["encoder_wrapper.image_adapter.rel_pos_table_list.0.weight"], **PRE
    )
    from one_peace.adapters.image import resize_pos_embed

    torch.testing.assert_close(
        resize_pos_embed(model.adapters["image"].pos_embed, (24, 24)),
        io["dbg.retrieval.image.pos_embed_resized"],
        **PRE,
    )
    out = model.forward_features({"image": {"pixels": io["in.image.src_images"]}}, return_layer_states=True)
    torch.testing.assert_close(out.adapter_states["image"], io["dbg.retrieval.image.adapter_out"], **HIDDEN)
    for i in range(2):
        torch.testing.assert_close(out.layer_states[i]["image"], io[f"dbg.retrieval.image.layer{i}_out"], **HIDDEN)
    torch.testing.assert_close(out.hidden["image"], io["out.retrieval.image.last_hidden"], **HIDDEN)
    torch.testing.assert_close(model.embed("image", out.hidden["image"]), io["out.retrieval.image.features"], **FEAT)
    pix = model.plugins["image"].build_preprocessor(model.config)(parity / "parity_image.png")["pixels"]
    torch.testing.assert_close(pix, io["in.image.src_images"][0], **PRE)


@torch.no_grad()
def test_audio_longer_than_15s(model, parity):
    """§11: normalise the whole clip, then keep 15 s; logarithmic audio buckets are used."""
    io = load_file(str(parity / "long_audio_io.safetensors"))
    sample = model.plugins["audio"].build_preprocessor(model.config)(parity / "parity_audio_long_17s_16k.wav")
    torch.testing.assert_close(sample["waveform"], io["in.audio.src_audios"][0], **PRE)
    assert torch.equal(sample["padding_mask"], io["in.audio.audio_padding_masks"][0])
    out = model.forward_features({"audio": {"waveform": io["in.audio.src_audios"]}}, return_layer_states=True)
    torch.testing.assert_close(out.adapter_states["audio"], io["dbg.audio.adapter_out"], **HIDDEN)
    for i in range(2):
        torch.testing.assert_close(out.layer_states[i]["audio"], io[f"dbg.audio.layer{i}_out"], **HIDDEN)
    torch.testing.assert_close(out.hidden["audio"], io["out.audio.last_hidden"], **HIDDEN)
    torch.testing.assert_close(model.embed("audio", out.hidden["audio"]), io["out.audio.features"], **FEAT)


def test_released_4b_layout_maps_onto_our_4b_model(parity):
    """§7: every key of the released layout maps to a parameter of the same shape, and no parameter lacks a source."""
    doc = json.loads((parity / "one_peace_4b_keys.json").read_text())["variants"][
        "one_peace_retrieval__head_val__from_pretrained"
    ]
    model = one_peace.build_model("one_peace_4b", modalities=("text", "image", "audio"), device="meta")
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    sources: dict[str, str] = {}
    ignored = []
    for key, shape, _dtype, _kind in doc["keys"]:
        if is_ignored(key):
            ignored.append(key)
            continue
        name = map_official_key(key)
        assert name is not None, f"no rule for official key {key}"
        assert name in params, f"{key} -> {name} is not a parameter"
        expected = (1,) if name == "logit_scale" and shape == [] else tuple(shape)  # ours is (1,) for FSDP2
        assert params[name] == expected, f"{key}: {shape} vs {params[name]}"
        assert name not in sources, f"{key} and {sources.get(name)} map to the same parameter"
        sources[name] = key
    assert set(sources) == set(params)
    assert {k.rsplit(".", 1)[-1] for k in ignored} <= {"rp_bucket", "position_idx", "version", "mask_embedding"}
    assert len(IGNORED) == 4
    # architecture inference from shapes alone (no cfg) gives the 4B config
    fake = {k: torch.empty(shape, device="meta") for k, shape, _d, _k in doc["keys"]}
    cfg, _ = infer_config(fake, None, "4b-keys")
    assert (cfg.embed_dim, cfg.layers, cfg.heads, cfg.ffn_dim) == (1536, 40, 24, 6144)


def test_official_names_round_trip_for_every_4b_key(parity):
    from one_peace.checkpoint.official import official_name

    doc = json.loads((parity / "one_peace_4b_keys.json").read_text())["variants"][
        "one_peace_retrieval__head_val__from_pretrained"
    ]
    for key, *_ in doc["keys"]:
        if not is_ignored(key):
            assert official_name(map_official_key(key)) == key
    with pytest.raises(KeyError, match="temporal_embed"):
        official_name("adapters.video.temporal_embed")
