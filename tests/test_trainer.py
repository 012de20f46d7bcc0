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


def test_accumulated_contrastive_micro_batches_equal_one_k_times_batch(tmp_path):
    """k=3 micro-batches of 2 give the loss and gradients of one batch of 6 (cached-feature accumulation): every
    micro-batch's samples are negatives of every other's; the plain per-micro-batch mean is a different problem."""
    import torch

    from one_peace.train.batches import BatchList
    from one_peace.train.trainer import Trainer

    torch.manual_seed(0)
    model = one_peace.build_model(
        "tiny", modalities=("text", "image"), modality_options={"image": {"image_size": 32}}, layer_scale_init=1.0
    )
    task = Task(model, {"c": (ContrastiveObjective(("image", "text"), label_smoothing=0.1), 1.0)})
    full = one_peace.example_inputs(("text", "image"), 6, model.config)
    full["text"]["tokens"][:3, -3:] = 1  # padding: micro-batches differ in length
    full["valid"] = torch.tensor([True, True, True, True, False, True])
    micro = [
        {
            "text": {k: v[i : i + 2] for k, v in full["text"].items()},
            "image": {k: v[i : i + 2] for k, v in full["image"].items()},
            "valid": full["valid"][i : i + 2],
        }
        for i in range(0, 6, 2)
    ]
    params = [p for p in task.parameters() if p.requires_grad]

    task.train()
    loss, logs = task(full)
    want = torch.autograd.grad(loss, params, allow_unused=True)

    trainer = Trainer(task, BatchList(micro), TrainerConfig(accumulation=3, device="cpu", precision="fp32"), tmp_path)
    task.zero_grad(set_to_none=True)
    agg = trainer.accumulate()
    assert math.isclose(agg["c/loss"], logs["c/loss"], rel_tol=1e-5)
    n_checked = 0
    for p, w in zip(params, want):
        if w is None:
            assert p.grad is None or float(p.grad.abs().max()) == 0.0
            continue
        torch.testing.assert_close(p.grad, w, atol=1e-5, rtol=1e-5)
        n_checked += 1
    assert n_checked > 10 and task.model.logit_scale.grad is not None

    # k independent small problems (what accumulation did before) give another loss
    with torch.no_grad():
        naive = sum(float(task(m)[0]) for m in micro) / 3
    assert abs(naive - logs["c/loss"]) > 1e-3


class _SlowBatches:
    """A BatchList that takes ``delay`` seconds to hand out each batch (a slow data pipeline)."""

    def __init__(self, batches, delay: float) -> None:
        from one_peace.train.batches import BatchList

        self.inner, self.delay = BatchList(batches), delay
        self.epoch = 0

    def __iter__(self):
        import time

        for batch in self.inner:
            time.sleep(self.delay)
            yield batch
        self.epoch = self.inner.epoch

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def _throughput_run(tmp_path, delay: float, **cfg):
    import json

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from one_peace.train.trainer import Trainer

    torch.manual_seed(0)
    model = one_peace.build_model("tiny", modalities=("text", "image"), modality_options={"image": {"image_size": 32}})
    task = Task(model, {"c": (ContrastiveObjective(("image", "text")), 1.0)})
    batch = one_peace.example_inputs(("text", "image"), 4, model.config)
    batch["valid"] = torch.tensor([True, True, True, False])
    # the FLOPs and tokens of one step, counted independently of the trainer
    with FlopCounterMode(display=False) as counter:
        task(batch)[0].backward()
    flops = counter.get_total_flops()
    tokens = sum(model.adapters[m](batch[m]).tokens.shape[:2].numel() for m in ("text", "image"))
    task.zero_grad(set_to_none=True)
    config = TrainerConfig(max_steps=4, log_every=2, save_every=4, device="cpu", precision="fp32", warmup_steps=1)
    for key, value in cfg.items():
        setattr(config, key, value)
    Trainer(task, _SlowBatches([batch] * 2, delay), config, tmp_path).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return rows, flops, tokens


def test_metrics_carry_samples_tokens_data_wait_and_mfu(tmp_path):
    """samples/s counts valid samples, tokens/s the positions entering the shared stack, MFU charges the counted
    FLOPs of a step per token against the given peak; a slow data source shows up as the data-wait fraction."""
    rows, flops, tokens = _throughput_run(tmp_path / "slow", delay=0.3, peak_tflops=0.5)
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert {"samples_per_s", "tokens_per_s", "data_wait", "mfu"} <= set(r)
        assert math.isclose(r["tokens_per_s"] / r["samples_per_s"], tokens / 3, rel_tol=1e-9)  # 3 valid of 4
        assert math.isclose(r["mfu"] * 0.5e12, flops / tokens * r["tokens_per_s"], rel_tol=1e-9)
        seconds = 2 * 3 / r["samples_per_s"]  # the interval: 2 steps of 3 valid samples
        assert 0.6 <= r["data_wait"] * seconds < seconds, r  # each of its 2 batches took >= 0.3 s to arrive
    fast, _, _ = _throughput_run(tmp_path / "fast", delay=0.0)  # the peak measured at start
    assert all(0 < r["mfu"] < 1.5 and r["data_wait"] * 2 * 3 / r["samples_per_s"] < 0.1 for r in fast), fast


def test_a_broken_tensorboard_or_matplotlib_warns_once_and_training_goes_on(tmp_path):
    """An installed package that fails at import (as TensorBoard does beside an incompatible protobuf) used to crash
    the run at its first log step: the trainer asked whether the package exists, not whether it imports."""
    import json
    import os
    import subprocess
    import sys
    import textwrap

    fake = tmp_path / "site"
    for name in ("tensorboard", "matplotlib"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(
            "raise TypeError('Descriptors cannot be created directly. If this call came from a _pb2.py file, "
            "your generated code is out of date')\n"
        )
    code = textwrap.dedent(
        f"""
        import torch, one_peace
        from one_peace.train.batches import BatchList
        from one_peace.train.objectives import ContrastiveObjective
        from one_peace.train.task import Task
        from one_peace.train.trainer import Trainer, TrainerConfig
        model = one_peace.build_model("tiny", modalities=("text", "image"),
                                      modality_options={{"image": {{"image_size": 32}}}})
        task = Task(model, {{"c": (ContrastiveObjective(("image", "text")), 1.0)}})
        batch = one_peace.example_inputs(("text", "image"), 2, model.config)
        batch["valid"] = torch.ones(2, dtype=torch.bool)
        cfg = TrainerConfig(max_steps=3, log_every=1, save_every=3, device="cpu", peak_tflops=1.0)
        print("DONE", Trainer(task, BatchList([batch]), cfg, {str(tmp_path / "out")!r}).fit())
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DONE" in out.stdout
    assert out.stderr.count("TensorBoard logging skipped") == 1, out.stderr
    assert "fails to import (TypeError: Descriptors cannot be created directly" in out.stderr
    assert out.stderr.count("the loss plot (loss.png) skipped") == 1, out.stderr
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and (tmp_path / "out" / "checkpoints" / "step_0000003").is_dir()
    assert not (tmp_path / "out" / "loss.png").exists()
