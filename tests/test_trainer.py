"""Trainer pieces: parameter groups (no decay, layer-wise lr decay), the schedule, freezing errors."""

from __future__ import annotations

import math

import pytest

import one_peace
from one_peace.train.objectives import ContrastiveObjective
from one_peace.train.task import Task
from one_peace.train.trainer import TrainerConfig, apply_freezing, lr_at, parameter_groups

pytestmark = pytest.mark.core


def _task():
    model = one_peace.build_model("tiny", modalities=("text", "image"))
    return Task(model, {"c": (ContrastiveObjective(("image", "text")), 1.0)})


def test_no_weight_decay_on_norms_biases_embeddings_and_layer_decay_scales():
    task = _task()
    cfg = TrainerConfig(weight_decay=0.05, layer_decay=0.5)
    groups = parameter_groups(task, cfg, num_layers=2)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(task.named_parameters())
    assert by_param[id(named["model.layers.0.attn.q_proj.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["model.layers.0.attn_norm.weight"])]["weight_decay"] == 0.0
    assert by_param[id(named["model.adapters.text.embed_tokens.weight"])]["weight_decay"] == 0.0
    assert by_param[id(named["model.layers.0.attn.q_proj.weight"])]["weight_decay"] == 0.05
    scale = {n: by_param[id(p)]["lr_scale"] for n, p in named.items()}
    assert scale["model.adapters.image.stem.conv1.weight"] == 0.5**3  # below layer 0
    assert scale["model.layers.0.attn.q_proj.weight"] == 0.5**2
    assert scale["model.layers.1.attn.q_proj.weight"] == 0.5
    assert scale["model.heads.image.weight"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_warmup_then_cosine_schedule():
    cfg = TrainerConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1) and all(lr_at(s, cfg) >= 0.1 for s in range(200))
    assert math.isclose(lr_at(35, cfg), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_freezing_by_globs_and_a_clear_error_when_nothing_trains():
    task = _task()
    names = apply_freezing(task, ["model.adapters.image.*"], ["*.stem.conv1.*"])
    assert names and all(n.startswith("model.adapters.image.") and "conv1" not in n for n in names)
    assert not task.model.layers[0].attn.q_proj.weight.requires_grad
    with pytest.raises(ValueError, match="leave nothing to train"):
        apply_freezing(task, [], ["*"])
    with pytest.raises(ValueError, match=r"trainer.trainable: 'nothing\.\*' matches no parameter"):
        apply_freezing(task, ["nothing.*"], [])


def test_trainable_sets_by_the_models_named_groups():
    task = _task()
    names = apply_freezing(task, ["modality.image", "logit_scale"], ["head.image"])
    own = {f"model.{n}" for n in task.model.parameter_groups("image")}
    assert set(names) == (own | {"model.logit_scale"}) - {n for n in own if n.startswith("model.heads.image.")}
    assert any(".ffns.image." in n for n in names) and not any(".ffns.text." in n for n in names)
    video = one_peace.build_model("tiny", modalities=("image", "video"))
    groups = video.named_parameter_groups()
    assert groups["adapters.video"] and groups["ffn.video"] == []  # video runs on the image FFNs
    video_task = Task(video, {"c": (ContrastiveObjective(("image", "video")), 1.0)})
    with pytest.raises(ValueError, match=r"'ffn\.video' matches no parameter"):
        apply_freezing(video_task, ["adapters.video", "ffn.video"], [])
