"""The encoder on the tiny config: every modality, fusion, padding, routing, token dropping, packing, compile."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import one_peace
from one_peace.models.layers import GeGLUFFN, route_ffn

pytestmark = pytest.mark.core

BUILTINS = ("text", "image", "audio", "video")


def _grads(model, prefix):
    return [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]


@pytest.mark.parametrize("modality", BUILTINS)
def test_every_builtin_modality_forward_backward(tiny_model, modality):
    inputs = one_peace.example_inputs((modality,), 2, tiny_model.config)
    tiny_model.train()
    emb = tiny_model.encode(modality, inputs[modality])
    assert emb.shape == (2, 64)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    emb.sum().backward()
    group = tiny_model.groups[modality]
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(tiny_model, f"adapters.{modality}."))
    assert tiny_model.layers[0].ffns[group].wi_0.weight.grad.abs().sum() > 0
    others = [g for g in tiny_model.layers[0].ffns if g != group]
    assert all(tiny_model.layers[0].ffns[g].wi_0.weight.grad is None for g in others)  # no FFN runs on foreign tokens


@pytest.mark.parametrize(
    "combo", [("text", "image"), ("text", "audio"), ("text", "image", "audio"), ("audio", "video", "text")]
)
def test_fused_forward(tiny_model, combo):
    inputs = one_peace.example_inputs(combo, 2, tiny_model.config)
    out = tiny_model.forward_features(inputs)
    assert list(out.hidden) == list(combo)
    for m in combo:
        alone = tiny_model.forward_features({m: inputs[m]}).hidden[m]
        assert out.hidden[m].shape == alone.shape
        assert not torch.allclose(out.hidden[m], alone, atol=1e-4), f"{m} tokens did not attend across modalities"
    sum(h.sum() for h in out.hidden.values()).backward()


def test_segment_order_gives_same_per_token_result(tiny_model):
    inputs = one_peace.example_inputs(("text", "image", "audio"), 2, tiny_model.config)
    a = tiny_model.forward_features(inputs)
    b = tiny_model.forward_features({m: inputs[m] for m in ("audio", "text", "image")})
    for m in inputs:
        torch.testing.assert_close(a.hidden[m], b.hidden[m], atol=2e-5, rtol=1e-5)


def _pad_text(batch, extra):
    tokens = batch["tokens"]
    return {"tokens": torch.cat([tokens, torch.ones(tokens.shape[0], extra, dtype=tokens.dtype)], 1)}


def test_padding_invariance_all_modalities(tiny_model):
    cfg = tiny_model.config
    inputs = one_peace.example_inputs(("text", "image", "audio", "video"), 3, cfg)
    # text: extra pad columns change nothing on real tokens
    base = tiny_model.forward_features({"text": inputs["text"]}).hidden["text"]
    padded = tiny_model.forward_features({"text": _pad_text(inputs["text"], 5)}).hidden["text"]
    real = ~torch.cat([torch.zeros(3, 1, dtype=torch.bool), inputs["text"]["tokens"].eq(1)], 1)
    torch.testing.assert_close(padded[:, : base.shape[1]][real], base[real], atol=1e-5, rtol=1e-5)
    # audio: appended zero samples + masked frames
    audio = inputs["audio"]
    longer = {
        "waveform": torch.cat([audio["waveform"], torch.zeros(3, 3200)], 1),
        "padding_mask": torch.cat([audio["padding_mask"], torch.ones(3, 10, dtype=torch.bool)], 1),
    }
    a0 = tiny_model.forward_features({"audio": audio}).hidden["audio"]
    a1 = tiny_model.forward_features({"audio": longer}).hidden["audio"]
    valid = ~audio["padding_mask"]
    torch.testing.assert_close(a1[:, : a0.shape[1]][valid], a0[valid], atol=1e-5, rtol=1e-5)
    # ... and every item equals its own unpadded forward
    for i in range(3):
        n = int(valid[i].sum())
        single = {"waveform": audio["waveform"][i : i + 1, : (n - 1) * 320 + 80], "padding_mask": None}
        s = tiny_model.forward_features({"audio": single}).hidden["audio"][0]
        assert s.shape[0] == n
        torch.testing.assert_close(a0[i, :n], s, atol=1e-5, rtol=1e-5)
    # the official switch reproduces the leak (padded frames feed the positional convs)
    tiny_model.official_padding = True
    leak = tiny_model.forward_features({"audio": longer}).hidden["audio"]
    tiny_model.official_padding = False
    assert not torch.allclose(leak[:, : a0.shape[1]][valid], a0[valid], atol=1e-4)
    # video: padded frames
    video = inputs["video"]
    extra = {
        "frames": torch.cat([video["frames"], torch.randn(3, 1, *video["frames"].shape[2:])], 1),
        "frame_mask": torch.tensor([[False, False, True]] * 3),
    }
    v0 = tiny_model.forward_features({"video": video}).hidden["video"]
    v1 = tiny_model.forward_features({"video": extra}).hidden["video"]
    torch.testing.assert_close(v1[:, : v0.shape[1]], v0, atol=1e-5, rtol=1e-5)
    # image: fused with text, more text padding changes nothing on image tokens
    i0 = tiny_model.forward_features({"text": inputs["text"], "image": inputs["image"]}).hidden["image"]
    i1 = tiny_model.forward_features({"text": _pad_text(inputs["text"], 7), "image": inputs["image"]}).hidden["image"]
    torch.testing.assert_close(i1, i0, atol=1e-5, rtol=1e-5)


def test_routing_matches_naive_per_token_reference():
    torch.manual_seed(0)
    ffns = torch.nn.ModuleDict({g: GeGLUFFN(16, 32) for g in ("text", "image", "audio")})
    x = torch.randn(2, 12, 16)
    ids = torch.randint(0, 3, (2, 12))
    names = ["text", "image", "audio"]
    naive = torch.stack([torch.stack([ffns[names[int(ids[b, t])]](x[b, t]) for t in range(12)]) for b in range(2)])
    torch.testing.assert_close(route_ffn(ffns, x, modality_ids=ids, id_to_group=names), naive, atol=1e-6, rtol=1e-6)
    segments = [("image", 5), ("text", 4), ("audio", 3)]
    seg_ids = torch.tensor([1] * 5 + [0] * 4 + [2] * 3).expand(2, 12)
    naive_seg = route_ffn(ffns, x, modality_ids=seg_ids, id_to_group=names)
    torch.testing.assert_close(route_ffn(ffns, x, segments=segments), naive_seg, atol=1e-6, rtol=1e-6)


def test_each_ffn_sees_exactly_its_tokens(tiny_model):
    inputs = one_peace.example_inputs(("text", "image", "audio", "video"), 2, tiny_model.config)
    seen: dict[str, int] = {}
    hooks = [
        ffn.register_forward_hook(
            lambda mod, inp, out, g=g: seen.__setitem__(g, seen.get(g, 0) + inp[0].shape[:-1].numel())
        )
        for g, ffn in tiny_model.layers[0].ffns.items()
    ]
    out = tiny_model.forward_features(inputs)
    for h in hooks:
        h.remove()
    sizes = {m: h.shape[0] * h.shape[1] for m, h in out.hidden.items()}
    assert seen == {"text": sizes["text"], "image": sizes["image"] + sizes["video"], "audio": sizes["audio"]}


def test_token_dropping_only_kept_tokens_enter_the_stack(tiny_model):
    inputs = one_peace.example_inputs(("image", "text"), 2, tiny_model.config)
    lengths = []
    hook = tiny_model.layers[0].register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    keep = torch.stack(
        [torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(256)[:63].sort().values + 1]) for _ in range(2)]
    )
    out = tiny_model.forward_features(inputs, keep_ids={"image": keep})
    hook.remove()
    text_len = inputs["text"]["tokens"].shape[1] + 1
    assert lengths == [64 + text_len]
    assert out.hidden["image"].shape == (2, 64, 64)
    # keeping every position is the full forward
    full = torch.arange(257).expand(2, 257)
    torch.testing.assert_close(
        tiny_model.forward_features(inputs, keep_ids={"image": full}).hidden["image"],
        tiny_model.forward_features(inputs).hidden["image"],
        atol=1e-5,
        rtol=1e-5,
    )


def test_token_dropping_generic_for_audio_and_video(tiny_model):
    inputs = one_peace.example_inputs(("audio", "video"), 2, tiny_model.config)
    keep_a = torch.tensor([[0, 1, 2, 5, 9, 20], [0, 3, 4, 7, -1, -1]])
    out = tiny_model.forward_features({"audio": inputs["audio"]}, keep_ids={"audio": keep_a})
    assert out.hidden["audio"].shape == (2, 6, 64)
    assert out.padding_mask["audio"].tolist() == [[False] * 6, [False] * 4 + [True] * 2]
    keep_v = torch.tensor([[0, 1, 300, 512]] * 2)
    assert tiny_model.forward_features({"video": inputs["video"]}, keep_ids={"video": keep_v}).hidden[
        "video"
    ].shape == (2, 4, 64)
    with pytest.raises(ValueError, match="keep_ids must index positions"):
        tiny_model.forward_features({"video": inputs["video"]}, keep_ids={"video": keep_v + 1000})


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_packed_sequences_match_unpacked(tiny_model, modality):
    inputs = one_peace.example_inputs((modality,), 5, tiny_model.config)
    ref = tiny_model.forward_features(inputs)
    hidden, mask = ref.hidden[modality], ref.padding_mask[modality]
    packed = tiny_model.forward_packed(modality, inputs[modality], row_length=2 * hidden.shape[1])
    assert packed.rows < 5
    valid = ~mask if mask is not None else torch.ones(hidden.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(packed.hidden[valid], hidden[valid], atol=2e-5, rtol=1e-5)
    # one CLS per sample: embeddings from the packed CLS states equal the normal ones
    torch.testing.assert_close(
        tiny_model.embed(modality, packed.hidden), tiny_model.embed(modality, hidden), atol=1e-5, rtol=1e-5
    )


def test_grad_checkpointing_gives_same_gradients(tiny_model):
    inputs = one_peace.example_inputs(("text", "image"), 2, tiny_model.config)
    tiny_model.train()

    def grads():
        tiny_model.zero_grad()
        out = tiny_model.forward_features(inputs)
        (out.hidden["text"].square().mean() + out.hidden["image"].square().mean()).backward()
        return {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}

    plain = grads()
    tiny_model.set_grad_checkpointing(True)
    ckpt = grads()
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5)


def _compiled_matches_eager(model, modalities, keep=False):
    """``torch.compile(model, fullgraph=True)`` (no graph break: no host synchronisation in the forward) gives the
    eager outputs, on a batch whose text rows are padded (and, with ``keep``, with token dropping)."""
    torch._dynamo.reset()
    inputs = one_peace.example_inputs(modalities, 3, model.config)
    if "text" in inputs:
        inputs["text"]["tokens"][0, -2:] = 1  # padding
    keep_ids = None
    if keep:
        keep_ids = {"image": torch.tensor([[0, 1, 3, 5], [0, 2, 4, -1], [0, 6, 7, 8]])}
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager = model(inputs, keep_ids).hidden
        out = compiled(inputs, keep_ids).hidden
    assert out.keys() == eager.keys()
    for m in eager:
        torch.testing.assert_close(out[m], eager[m], atol=1e-5, rtol=1e-5)


def test_fullgraph_compile_of_a_fused_forward_matches_eager(tiny_model):
    """The default run's one compile test: text (padded) and image fused, image tokens dropped."""
    _compiled_matches_eager(tiny_model, ("text", "image"), keep=True)


@pytest.mark.slow
@pytest.mark.parametrize("modality", BUILTINS)
def test_fullgraph_compile_of_every_builtin_modality_matches_eager(tiny_model, modality):
    _compiled_matches_eager(tiny_model, (modality,))


def test_bf16_inference_path(tiny_model):
    inputs = one_peace.example_inputs(("text", "image"), 2, tiny_model.config)
    ref = tiny_model.encode("image", inputs["image"])
    model16 = tiny_model.to(torch.bfloat16)
    with torch.inference_mode():
        emb = model16.encode("image", {"pixels": inputs["image"]["pixels"].bfloat16()})
    assert emb.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(emb.float(), ref).min() > 0.99


def test_logit_scale_is_a_log_and_is_what_the_contrastive_loss_uses():
    model = one_peace.build_model("tiny", modalities=("text",))
    assert model.logit_scale.shape == (1,)
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    from one_peace.train.objectives import scaled_logit_scale

    assert math.isclose(float(scaled_logit_scale(model.logit_scale)), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) is clamped to 100, as the official model does
    assert math.isclose(float(scaled_logit_scale(model.logit_scale)), 100.0, rel_tol=1e-5)


def test_4b_builds_on_meta_with_official_parameter_count(parity: Path):
    model = one_peace.build_model("one_peace_4b", modalities=("text", "image", "audio"), device="meta")
    assert all(p.is_meta for p in model.parameters())
    keys = json.loads((parity / "one_peace_4b_keys.json").read_text())["variants"][
        "one_peace_retrieval__head_val__from_pretrained"
    ]
    # the only official parameter we do not keep is the unused audio mask_embedding (1 x 1536)
    assert one_peace.count_parameters(model) == keys["num_parameters"] - 1536
    assert len(model.layers) == 40 and len(model.layers[0].ffns) == 3


def test_bad_batches_give_clear_errors(tiny_model):
    with pytest.raises(KeyError, match="text batch must contain 'tokens'"):
        tiny_model.encode("text", {"ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"multiple of 16"):
        tiny_model.encode("image", {"pixels": torch.zeros(1, 3, 250, 250)})
    with pytest.raises(ValueError, match="same batch size"):
        tiny_model.forward_features(
            {"text": {"tokens": torch.full((2, 3), 5)}, "image": {"pixels": torch.zeros(3, 3, 32, 32)}}
        )
    with pytest.raises(KeyError, match="not in this model"):
        one_peace.build_model("tiny", modalities=("text",)).encode("audio", {"waveform": torch.zeros(1, 16000)})
    with pytest.raises(ValueError, match="text preprocessing needs a tokenizer"):
        tiny_model.encode("text", ["a dog"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers backend needs a CUDA device")
def test_xformers_backend_agrees_with_sdpa():  # pragma: no cover - GPU only
    pytest.importorskip("xformers", reason="the 'gpu' extra (xformers) is not installed")
    model = one_peace.build_model("tiny", modalities=("text", "image")).cuda().eval()
    inputs = one_peace.example_inputs(("text", "image"), 2, model.config)
    inputs = {m: {k: v.cuda() for k, v in b.items()} for m, b in inputs.items()}
    ref = model.forward_features(inputs).hidden
    for layer in model.layers:
        layer.attn.backend = "xformers"
    out = model.forward_features(inputs).hidden
    for m in ref:
        torch.testing.assert_close(out[m], ref[m], atol=1e-5, rtol=1e-5)


def test_log_mel_front_end_is_padding_invariant_and_round_trips(tmp_path):
    from one_peace.adapters.audio import LogMelFrontEnd

    options = {"audio": {"frontend": "fbank", "feature_dim": 32}}
    torch.manual_seed(0)
    model = one_peace.build_model("tiny", modalities=("text", "audio"), modality_options=options).eval()
    assert isinstance(model.adapters["audio"].feature_extractor, LogMelFrontEnd)
    batch = one_peace.example_inputs(("audio",), 3, config=model.config)["audio"]  # 1 s, 0.75 s, 0.5 s, padded
    together = model.encode("audio", batch)
    for i, n in enumerate((16000, 12000, 8000)):
        frames = int((~batch["padding_mask"][i]).sum())
        alone = {
            "waveform": batch["waveform"][i : i + 1, :n],
            "padding_mask": batch["padding_mask"][i : i + 1, :frames],
        }
        torch.testing.assert_close(model.encode("audio", alone), together[i : i + 1], atol=1e-5, rtol=1e-5)
    assert frames == 24 + 1  # 0.5 s: 48 windows of 25 ms every 10 ms, halved by the stride-2 conv, + CLS
    one_peace.save(model, tmp_path / "fbank")
    again = one_peace.load(tmp_path / "fbank").eval()
    torch.testing.assert_close(again.encode("audio", batch), together)
    with pytest.raises(ValueError, match="frontend"):
        one_peace.build_model("tiny", modalities=("audio",), modality_options={"audio": {"frontend": "mfcc"}})


def test_flex_attention_equals_sdpa_on_padded_dropped_and_packed_batches(tiny_model):
    """attn_backend=flex (relative bias as a score_mod over an index, padding and packing as a block mask; no dense
    bias) gives SDPA's outputs within 1e-5 in fp32: fused text (padded) + image with dropped tokens, audio with
    per-sample relative indices after token dropping, and text samples packed several to a row."""
    inputs = one_peace.example_inputs(("text", "image", "audio"), 3, tiny_model.config)
    inputs["text"]["tokens"][0, -3:] = 1
    t = inputs["image"]["pixels"].shape[-1] // 16
    keep = {
        "image": torch.tensor([[0, 1, 3, 5], [0, 2, 4, -1], [0, t, t + 1, t * t]]),
        "audio": torch.tensor([[0, 1, 2, 7], [0, 3, 5, -1], [0, 4, 6, 8]]),
    }
    tokens = torch.randint(4, 100, (5, 12), generator=torch.Generator().manual_seed(0))
    for i, n in enumerate([12, 4, 5, 3, 7]):
        tokens[i, n:] = 1  # padding: short samples pack together
    texts = {"tokens": tokens}
    try:
        with torch.no_grad():
            want = [tiny_model({m: inputs[m] for m in ("text", "image")}, keep).hidden]
            want.append(tiny_model({"audio": inputs["audio"]}, {"audio": keep["audio"]}).hidden)
            packed_want = tiny_model.forward_packed("text", texts, row_length=13)
            tiny_model.set_attn_backend("flex")
            got = [tiny_model({m: inputs[m] for m in ("text", "image")}, keep).hidden]
            got.append(tiny_model({"audio": inputs["audio"]}, {"audio": keep["audio"]}).hidden)
            packed = tiny_model.forward_packed("text", texts, row_length=13)
    finally:
        tiny_model.set_attn_backend("sdpa")
    for g, w in zip(got, want):
        for m in w:
            torch.testing.assert_close(g[m], w[m], atol=1e-5, rtol=1e-5)
    assert packed.rows < 5  # several samples shared a row
    real = texts["tokens"].ne(1)
    real = torch.cat([torch.ones(5, 1, dtype=torch.bool), real], dim=1)
    torch.testing.assert_close(packed.hidden[real], packed_want.hidden[real], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        tiny_model.set_attn_backend("flash")


def test_a_compiled_model_is_freed_with_its_last_reference():
    """encode(compile=True)'s cache held each model through its compiled bound method: compiled models were never
    freed. The compiled forward now lives on the model (a cycle the garbage collector frees)."""
    import gc
    import weakref

    import one_peace
    from one_peace.models.encoding import compiled_forward

    model = one_peace.build_model("tiny", modalities=("text",))
    assert compiled_forward(model) is compiled_forward(model)  # built once per model
    assert "_one_peace_compiled_forward" not in "".join(model.state_dict())
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_layer_scale_survives_float16():
    """Folding a 1e-6 layer scale into the output projection underflowed under float16 autocast (the fp16 training
    precision; relative error 0.81); the scale now multiplies the output when the matmul runs in float16."""
    from one_peace.models.layers import GeGLUFFN

    torch.manual_seed(0)
    ffn = GeGLUFFN(64, 256)
    x = torch.randn(4, 10, 64)
    scale = torch.full((64,), 1e-6)
    ref = ffn(x) * scale  # float32, unfolded
    with torch.autocast("cpu", dtype=torch.float16):
        auto = ffn(x, scale).float()
    assert ((auto - ref).norm() / ref.norm()) < 0.01
    torch.testing.assert_close(ffn(x, scale), ref, rtol=1e-4, atol=1e-9)  # float32 still folds, same result
