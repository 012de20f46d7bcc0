"""#28: a video's picture and sound read from one file and fused through the shared attention (av_fusion)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import one_peace
from one_peace.run import run

pytest.importorskip("av")


def _run(out: Path, *overrides: str) -> dict:
    with initialize_config_module(config_module="one_peace.recipes", version_base=None):
        cfg = compose(config_name="config", overrides=["recipe=av_fusion", f"output_dir={out}", *overrides])
    return run(cfg)


def _zero_shot(checkpoint: str, valid: Path, modality: str) -> float:
    from one_peace.eval.__main__ import EvalConfig, evaluate

    cfg = EvalConfig(task="zero_shot", checkpoint=checkpoint, data=str(valid), modality=modality, label_field="scene")
    cfg.classes, cfg.fields = ["harmony", "clash"], {"video": "clip", "audio": "clip"}
    cfg.out = str(valid.parent / f"zs-{modality}.json")
    return float(evaluate(cfg)["top1"])


def test_av_fusion_recipe_fuses_one_file_s_picture_and_sound(tmp_path):
    """The recipe's layout in 2 steps: the fused side trains, the zero-shot evaluation runs on fused items, and a
    fused item is one joint pass over both halves of the same file."""
    from one_peace.models.encoding import encode_multimodal

    results = _run(tmp_path, "data.demo_train=16", "data.demo_valid=8", "trainer.max_steps=2", "trainer.batch_size=8")
    assert results["samples"] == 8 and "top1" in results
    model = one_peace.load(results["checkpoint"])
    assert model.config.modality_options["image"]["image_size"] == 32  # the video frames follow data.image_size
    rows = [json.loads(x) for x in (tmp_path / "demo_data" / "valid.jsonl").read_text().splitlines()]
    clips = [str(tmp_path / "demo_data" / r["clip"]) for r in rows[:3]]
    fused = model.encode("video+audio", clips)
    assert torch.allclose(fused, encode_multimodal(model, {"video": clips, "audio": clips}), atol=1e-6)
    assert not torch.allclose(fused, model.encode("video", clips), atol=1e-3)
    assert torch.allclose(fused.norm(dim=-1), torch.ones(3), atol=1e-5)
    from one_peace.eval.__main__ import EvalConfig, evaluate

    valid = tmp_path / "demo_data" / "valid.jsonl"
    cfg = EvalConfig(task="retrieval", checkpoint=results["checkpoint"], data=str(valid), pair=["video+audio", "text"])
    cfg.fields, cfg.group_field, cfg.out = (
        {"video": "clip", "audio": "clip", "text": "scene"},
        "scene",
        str(tmp_path / "r"),
    )
    retrieval = evaluate(cfg)
    assert (retrieval["video+audio_items"], retrieval["text_items"]) == (8, 2) and "text->video+audio/R@1" in retrieval


@pytest.mark.slow
def test_fusion_beats_either_half_on_scenes_that_need_both(tmp_path):
    """Done-when of #28: the scene is decided by the colour and the pitch together (an XOR); after the recipe the
    fused zero-shot accuracy is at least 0.2 above the better single modality (chance 0.5)."""
    results = _run(tmp_path, "data.num_workers=0")
    valid = tmp_path / "demo_data" / "valid.jsonl"
    fused = _zero_shot(results["checkpoint"], valid, "video+audio")
    video = _zero_shot(results["checkpoint"], valid, "video")
    audio = _zero_shot(results["checkpoint"], valid, "audio")
    print(f"zero-shot scene accuracy: fused {fused:.3f}, video {video:.3f}, audio {audio:.3f}, chance 0.500")
    assert fused == pytest.approx(results["top1"])
    assert fused >= max(video, audio) + 0.2, (fused, video, audio)
