"""Training checkpoints under faults (injected, not SIGKILLed): atomic replacement, fallback, clean resume."""

from __future__ import annotations

import json

import pytest
import torch

import one_peace
from one_peace.train import checkpointing
from one_peace.train.batches import BatchList
from one_peace.train.objectives import ContrastiveObjective
from one_peace.train.task import Task
from one_peace.train.trainer import Trainer, TrainerConfig, latest_checkpoint

pytestmark = pytest.mark.core


def _trainer(out, size="tiny", seed=0, **cfg):
    torch.manual_seed(seed)
    model = one_peace.build_model(size, modalities=("text", "image"), modality_options={"image": {"image_size": 32}})
    task = Task(model, {"c": (ContrastiveObjective(("image", "text")), 1.0)})
    batches = []
    for i in range(3):
        b = one_peace.example_inputs(("text", "image"), batch_size=2, config=model.config, seed=i)
        b["valid"] = torch.ones(2, dtype=torch.bool)
        batches.append(b)
    settings = dict(max_steps=4, save_every=2, log_every=1, keep_last=3, warmup_steps=1) | cfg
    return Trainer(task, BatchList(batches, shuffle=True), TrainerConfig(**settings), out)


class _Crash(Exception):
    pass


def test_overwriting_a_checkpoint_never_deletes_it_first(tmp_path, monkeypatch):
    """#10.17: a crash between moving the old step aside and renaming the new one in keeps the step."""
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit()
    real = checkpointing.os.replace
    calls = []

    def replace(src, dst):
        calls.append((str(src), str(dst)))
        if len(calls) == 2:  # the old folder is aside, the new one not yet in place
            raise _Crash
        return real(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", replace)
    with pytest.raises(_Crash):
        trainer.save()
    monkeypatch.setattr(checkpointing.os, "replace", real)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step_0000002" and (ckpt / "COMPLETE").is_file()
    assert one_peace.load(ckpt).config.embed_dim == 64


def test_resuming_a_finished_run_does_not_rewrite_its_final_checkpoint(tmp_path, monkeypatch):
    _trainer(tmp_path).fit()
    final = latest_checkpoint(tmp_path)
    again = _trainer(tmp_path, resume=True)
    monkeypatch.setattr(again, "save", lambda: (_ for _ in ()).throw(AssertionError("re-saved a finished run")))
    assert again.fit() == final


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one_and_metrics_have_no_duplicates(tmp_path, capsys):
    reference = _trainer(tmp_path / "ref")
    reference.fit()
    ref_state = {k: v.clone() for k, v in reference.task.state_dict().items()}

    broken = _trainer(tmp_path / "run", max_steps=4)
    real_save = broken.save

    def save_then_crash():  # the process dies after logging step 4 and writing (a damaged) step-4 checkpoint
        path = real_save()
        if broken.step == 4:
            (path / "training_state" / "rank0.pt").write_bytes(b"not a torch file")
            raise _Crash
        return path

    broken.save = save_then_crash  # type: ignore[method-assign]
    with pytest.raises(_Crash):
        broken.fit()
    resumed = _trainer(tmp_path / "run", seed=7, resume=True)
    resumed.fit()
    out = capsys.readouterr().out
    assert "unreadable resume state" in out and "falling back to the previous complete checkpoint step_0000002" in out
    for k, v in resumed.task.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resuming_into_another_model_size_names_the_shape(tmp_path):
    _trainer(tmp_path, max_steps=2).fit()
    other = _trainer(tmp_path, resume=True, max_steps=3)
    cfg = one_peace.model_config("tiny", ("text", "image"), modality_options={"image": {"image_size": 32}})
    cfg.embed_dim, cfg.ffn_dim = 32, 64
    narrow = one_peace.build_model(cfg)  # the same run resumed with a narrower model
    other.task = Task(narrow, {"c": (ContrastiveObjective(("image", "text")), 1.0)})
    other.opt = torch.optim.AdamW(other.task.parameters())
    with pytest.raises(ValueError, match=r"has shape \(.*\), the model's is .*another model size"):
        other.resume()
