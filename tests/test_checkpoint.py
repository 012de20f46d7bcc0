"""Checkpoints: safe loading of official files, the converter, our folder format, and clear errors."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from one_peace.adapters.text import TextTokenizer
from safetensors.torch import load_file

import one_peace
from one_peace.checkpoint import CheckpointError
from one_peace.convert import convert
from one_peace.convert import main as convert_main

pytestmark = pytest.mark.core


def _features(model, io):
    with torch.no_grad():
        return {
            "text": model.encode("text", {"tokens": io["in.text.src_tokens"]}),
            "image": model.encode("image", {"pixels": io["in.image.src_images"]}),
            "audio": model.encode(
                "audio", {"waveform": io["in.audio.src_audios"], "padding_mask": io["in.audio.audio_padding_masks"]}
            ),
        }


def test_fairseq_style_file_with_omegaconf_and_namespace_loads(parity, tmp_path, parity_io):
    from omegaconf import OmegaConf

    state = load_file(str(parity / "one_peace_tiny_state.safetensors"))
    cfg = json.loads((parity / "one_peace_tiny_config.json").read_text())
    dcfg = OmegaConf.create(
        {
            "model": {"_name": "one_peace_retrieval", "encoder": cfg["encoder"]},
            "task": cfg["task"],
            "optimization": {"lr": [0.1, 0.2]},
        }
    )
    path = tmp_path / "fairseq.pt"
    torch.save({"cfg": dcfg, "args": argparse.Namespace(arch="one_peace", seed=1), "model": state}, path)
    model = one_peace.load(path)
    assert (model.config.embed_dim, model.config.layers, model.config.heads) == (64, 2, 4)
    from one_peace.checkpoint.safe_pickle import safe_torch_load

    data = safe_torch_load(path)
    assert data["cfg"]["optimization"]["lr"] == [0.1, 0.2] and data["args"] == {"arch": "one_peace", "seed": 1}
    assert data["cfg"]["model"]["encoder"]["text_adapter"]["bucket_size"] == 256
    torch.testing.assert_close(_features(model, parity_io)["image"], parity_io["out.image.features"], atol=1e-5, rtol=0)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_other_globals_is_refused_without_executing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"encoder_wrapper.x": torch.zeros(1)}, "payload": _Evil(str(marker))}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to unpickle.*(posix|os)\.system"):
        one_peace.load(path)
    assert not marker.exists()


def test_bare_half_precision_state_dict_without_cfg(parity, tmp_path, parity_io):
    state = load_file(str(parity / "one_peace_tiny_state.safetensors"))  # float16 floats, int16 buffers
    path = tmp_path / "bare.pt"
    torch.save(state, path)
    model = one_peace.load(path)
    assert next(model.parameters()).dtype == torch.float32
    torch.testing.assert_close(_features(model, parity_io)["text"], parity_io["out.text.features"], atol=1e-5, rtol=0)


def test_bad_files_fail_with_errors_naming_file_and_key(official_tiny, tmp_path, parity):
    raw = official_tiny.read_bytes()
    trunc = tmp_path / "truncated.pt"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: not a readable torch checkpoint"):
        one_peace.load(trunc)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=r"garbage\.pt"):
        one_peace.load(garbage)
    other = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(10)}, other)
    with pytest.raises(CheckpointError, match=r"resnet\.pt: no 'encoder_wrapper\.\*' keys"):
        one_peace.load(other)
    state = load_file(str(parity / "one_peace_tiny_state.safetensors"))
    state["text_proj.weight"] = torch.zeros(64, 32)
    wrong = tmp_path / "wrong_shape.pt"
    torch.save({"model": state}, wrong)
    with pytest.raises(CheckpointError, match=r"wrong_shape\.pt: key 'text_proj\.weight' has shape \(64, 32\)"):
        one_peace.load(wrong)
    state = load_file(str(parity / "one_peace_tiny_state.safetensors"))
    del state["encoder_wrapper.fusion_model.layers.1.gamma_2"]
    missing = tmp_path / "missing.pt"
    torch.save({"model": state}, missing)
    with pytest.raises(CheckpointError, match=r"missing\.pt: missing weights.*layers\.1\.gamma_2"):
        one_peace.load(missing)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        one_peace.load(tmp_path / "nope.pt")


def test_converter_output_loads_back_to_identical_outputs(official_tiny, parity, tmp_path, parity_io):
    ref = one_peace.load(official_tiny, bpe_dir=parity / "bpe")
    report = convert(official_tiny, tmp_path / "converted", bpe_dir=parity / "bpe", shard_size=64 << 10)
    assert len(report.shards) > 1 and (tmp_path / "converted" / "model.safetensors.index.json").is_file()
    assert not report.unknown and not report.missing and len(report.ignored) == 6
    model = one_peace.load(tmp_path / "converted")
    assert model.tokenizer is not None and model.tokenizer.encode("a dog.") == ref.tokenizer.encode("a dog.")
    a, b = _features(ref, parity_io), _features(model, parity_io)
    for m in a:
        assert torch.equal(a[m], b[m])
    torch.testing.assert_close(model.encode("text", ["a dog."]), ref.encode("text", ["a dog."]), atol=0, rtol=0)


def test_converter_reports_unknown_and_carries_pretrain_keys(parity, tmp_path, capsys):
    state = load_file(str(parity / "one_peace_tiny_state.safetensors"))
    extra = load_file(str(parity / "one_peace_tiny_pretrain_extra_state.safetensors"))
    state.update(extra)
    state["some_new_head.weight"] = torch.zeros(3)
    src = tmp_path / "pretrain.pt"
    torch.save({"model": state}, src)
    assert convert_main([str(src), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "some_new_head.weight" in printed and f"carried {len(extra)} pretraining-only key(s)" in printed
    carried = load_file(str(tmp_path / "out" / "pretrain_decoder.safetensors"))
    assert carried.keys() == extra.keys() and all(torch.equal(carried[k], extra[k]) for k in extra)
    state = load_file(str(parity / "one_peace_tiny_state.safetensors"))
    del state["image_proj.bias"]
    torch.save({"model": state}, tmp_path / "incomplete.pt")
    assert convert_main([str(tmp_path / "incomplete.pt"), str(tmp_path / "out2")]) == 1
    assert "heads.image.bias" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_our_checkpoint_round_trips_bitwise(tiny_model, tmp_path):
    tiny_model.tokenizer = TextTokenizer.train(
        ["a red square", "a blue circle on grass", "a chirp rising"], vocab_size=300
    )
    folder = one_peace.save(tiny_model, tmp_path / "ckpt")
    loaded = one_peace.load(folder)
    assert loaded.config.to_dict() == tiny_model.config.to_dict()
    inputs = one_peace.example_inputs(("text", "image", "audio", "video"), 2, tiny_model.config)
    with torch.no_grad():
        for m, batch in inputs.items():
            assert torch.equal(loaded.encode(m, batch), tiny_model.encode(m, batch))
        assert torch.equal(loaded.encode("text", ["a red square"]), tiny_model.encode("text", ["a red square"]))
    assert loaded.adapters["video"].image is loaded.adapters["image"]


def test_folder_errors_name_the_file(tiny_model, tmp_path):
    folder = one_peace.save(tiny_model, tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        one_peace.load(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model"]["heads"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json.*divisible by heads"):
        one_peace.load(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: invalid JSON"):
        one_peace.load(folder)
