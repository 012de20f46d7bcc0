"""#26: each modality's encoder exported (ONNX for ONNX Runtime, torch.export), matching eager fp32 at two batch
sizes and two sequence lengths; int8 and bf16 as precisions of ``encode`` and ``embed``. Text runs by default; the
image, audio and plugin exports are ``slow`` (each ~10-20 s on 2 cores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import one_peace
from one_peace.export import ExportError, export, run_exported

TEXTS = ["a red circle", "a blue square on a green field", "two yellow triangles", "grey"]


@pytest.fixture(scope="module")
def model():
    """A tiny text/image/audio/motion model with a trained tokenizer (nondefault init so every layer matters)."""
    from one_peace.adapters.text import TextTokenizer

    torch.manual_seed(0)
    m = one_peace.build_model("tiny", modalities=("text", "image", "audio", "motion"), layer_scale_init=0.5)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "rel_pos_table" in name or "cls_" in name:
                p.normal_(0, 0.5)
    m.tokenizer = TextTokenizer.train(TEXTS * 4, vocab_size=280)
    return m.eval()


def _eager(model, modality: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The eager fp32 embeddings (the model's own attention backend, SDPA)."""
    with torch.no_grad():
        return model.encode(modality, batch)


def _text_batches(model) -> list[dict[str, torch.Tensor]]:
    """Two batch sizes x two lengths, with padded rows."""
    return [model.prepare("text", texts) for texts in (TEXTS[:1], TEXTS[:3], [TEXTS[1] * 3], [TEXTS[3], TEXTS[1] * 3])]


def _audio_batches(model) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(n).astype(np.float32) for n in (16000, 20000, 40000)]
    return [
        model.prepare("audio", [(c, 16000) for c in group])
        for group in ([clips[0]], [clips[0], clips[1], clips[0]], [clips[2]], [clips[1], clips[2]])
    ]


def _motion_batches(model) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(0)
    seqs = [rng.standard_normal((n, 6)).astype(np.float32) for n in (40, 64, 150)]
    return [model.prepare("motion", g) for g in ([seqs[0]], [seqs[0], seqs[1], seqs[0]], [seqs[2]], seqs[1:])]


def _image_batches(model) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 40, 3), dtype=np.uint8) for _ in range(3)]
    return [model.prepare("image", images[:1]), model.prepare("image", images)]


def _check_export(model, modality: str, batches, folder: Path, format: str = "onnx") -> None:
    report = export(model, modality, folder, format=format)
    lengths = {tuple(b[k].shape[1] for k in sorted(b) if b[k].dim() > 1) for b in batches}
    assert len({len(next(iter(b.values()))) for b in batches}) >= 2  # two batch sizes
    assert modality == "image" or len(lengths) >= 2  # two sequence lengths
    for batch in batches:
        want = _eager(model, modality, batch)
        got = run_exported(folder, batch)
        assert (got - want).abs().max() < 1e-4, (modality, {k: tuple(v.shape) for k, v in batch.items()})
    assert report.inputs and all(dims[0] == "batch" for dims in report.inputs.values())


def test_text_export_matches_eager_and_its_example_runs_with_onnxruntime_alone(model, tmp_path, capsys):
    from one_peace.export import main

    checkpoint = one_peace.save(model, tmp_path / "ck")
    out = tmp_path / "text"
    assert main([f"checkpoint={checkpoint}", "modality=text", f"out={out}", "precision=int8"]) == 0
    printed = capsys.readouterr().out
    assert "max abs difference from eager" in printed and "int8: mean cosine" in printed
    assert {"model.onnx", "model.int8.onnx", "preprocess.json", "example.py", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    for batch in _text_batches(model):  # two batch sizes x two lengths, padded rows included
        want = _eager(model, "text", batch)
        assert (run_exported(out, batch) - want).abs().max() < 1e-4
        assert F.cosine_similarity(run_exported(out, batch, int8=True), want).min() > 0.99
    spec = json.loads((out / "preprocess.json").read_text())
    assert spec["inputs"]["tokens"]["dims"] == ["batch", "tokens"] and spec["inputs"]["tokens"]["dtype"] == "int64"
    assert spec["tokenizer"]["files"] == ["tokenizer.json"] and spec["preprocessing"]["pad_id"] == 1
    assert spec["output"] == {"name": "embeddings", "dims": ["batch", 64], "l2_normalised": True}

    done = subprocess.run([sys.executable, "example.py"], cwd=out, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "embeddings (2, 64)" in done.stdout
    assert float(done.stdout.rsplit(":", 1)[1]) < 1e-4

    program_dir = export(model, "text", tmp_path / "pt2", format="torch_export").folder
    for batch in _text_batches(model):
        assert (run_exported(program_dir, batch) - _eager(model, "text", batch)).abs().max() < 1e-4
    assert model.config.attn_backend == "sdpa"  # the export's plain attention was undone


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["image", "audio", "motion"])
def test_every_modality_exports_and_matches_eager(model, modality, tmp_path):
    batches = {"image": _image_batches, "audio": _audio_batches, "motion": _motion_batches}[modality](model)
    _check_export(model, modality, batches, tmp_path / modality)
    _check_export(model, modality, batches, tmp_path / f"{modality}-pt2", format="torch_export")


def test_a_plugin_that_cannot_be_traced_is_refused_naming_it_and_the_operation(model, tmp_path, monkeypatch):
    adapter = model.adapters["motion"]
    original = type(adapter).forward

    def branchy(self, batch, keep_ids=None):
        if batch["frames"].abs().max() > 100:  # Python control flow on a tensor's value
            return original(self, batch, keep_ids)
        return original(self, batch, keep_ids)

    monkeypatch.setattr(type(adapter), "forward", branchy)
    with pytest.raises(ExportError) as caught:
        export(model, "motion", tmp_path / "motion")
    message = str(caught.value)
    assert "modality 'motion' (plugin 'motion' (one-peace-motion" in message
    assert 'if batch["frames"].abs().max() > 100' in message and "cannot be traced" in message
    assert model.config.attn_backend == "sdpa"


def test_encode_precisions_bf16_and_int8_against_fp32(model, monkeypatch):
    import one_peace.export as export_mod
    from one_peace.models.precision import cpu_peaks, resolve_precision

    fp32 = model.encode("text", TEXTS)
    bf16 = model.encode("text", TEXTS, precision="bf16")
    assert bf16.dtype == torch.float32 and F.cosine_similarity(bf16, fp32).min() > 0.99
    assert next(model.parameters()).dtype == torch.float32  # the model itself is unchanged

    calls = []
    real = export_mod.export
    monkeypatch.setattr(export_mod, "export", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    int8 = model.encode("text", TEXTS, precision="int8")
    assert F.cosine_similarity(int8, fp32).min() > 0.99 and not torch.equal(int8, fp32)
    assert torch.equal(model.encode("text", TEXTS, precision="int8"), int8) and calls == ["text"]  # built once
    with torch.no_grad():
        model.heads["text"].weight.mul_(1.0)  # an in-place change: the int8 graph is built again
    model.encode("text", TEXTS[:1], precision="int8")
    assert calls == ["text", "text"]
    with pytest.raises(ValueError, match="L2-normalised embeddings only"):
        model.encode("text", TEXTS, precision="int8", normalize=False)
    with pytest.raises(ValueError, match="precision must be one of"):
        model.encode("text", TEXTS, precision="int4")

    peaks = cpu_peaks()
    assert resolve_precision("auto", "cpu") == ("bf16" if peaks["bf16"] >= 1.5 * peaks["fp32"] else "fp32")


def test_embed_records_its_precision_and_refuses_to_mix_them_on_resume(model, tmp_path):
    from one_peace import embed as embed_mod
    from one_peace.retrieval.store import EmbeddingStore

    checkpoint = one_peace.save(model, tmp_path / "ck")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    base = dict(checkpoint=str(checkpoint), data=str(manifest), modality="text", progress=False, workers=0)
    base["index"] = "flat"
    embed_mod.embed(embed_mod.EmbedConfig(out=str(tmp_path / "int8"), precision="int8", dtype="float32", **base))
    store = EmbeddingStore(tmp_path / "int8")
    assert store.info()["model"]["precision"] == "int8"
    np.testing.assert_allclose(store.vectors(), model.encode("text", TEXTS, precision="int8").numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="embedded in precision int8, this run would embed in fp32"):
        embed_mod.embed(embed_mod.EmbedConfig(out=str(tmp_path / "int8"), precision="fp32", mode="resume", **base))
