"""The light core: what importing and using the inference surface pulls in, missing extras, training without fairseq2.

Everything here runs in the core environment (core + retrieval + dev extras, newest torch), as well as the full one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import one_peace
from one_peace.train.batches import BatchList, BatchSource
from one_peace.train.objectives import ContrastiveObjective
from one_peace.train.task import Task
from one_peace.train.trainer import Trainer, TrainerConfig, latest_checkpoint

pytestmark = pytest.mark.core

ROOT = Path(__file__).resolve().parents[1]
#: top-level modules the inference surface must never import (training, plotting, the Hydra CLI layer)
FORBIDDEN = ("fairseq2", "fairseq2n", "hydra", "omegaconf", "tensorboard", "matplotlib", "torchaudio")


def _python(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def test_inference_surface_imports_no_training_plotting_or_hydra_module(parity, official_tiny, tmp_path):
    """``import one_peace``, ``load`` (official file and our folder), ``encode``, conversion and the trainer module."""
    code = f"""
        import json, sys
        import one_peace
        after_import = sorted(sys.modules)
        model = one_peace.load({str(official_tiny)!r}, bpe_dir={str(parity / "bpe")!r})
        text = model.encode("text", ["a dog on grass", "two cats"])
        image = model.encode("image", [{str(parity / "parity_image.png")!r}])
        audio = model.encode("audio", [{str(parity / "parity_audio_16k.wav")!r}])
        one_peace.save(model, {str(tmp_path / "folder")!r})
        again = one_peace.load({str(tmp_path / "folder")!r})
        assert (again.encode("text", ["a dog on grass", "two cats"]) - text).abs().max() < 1e-5
        import one_peace.convert, one_peace.checkpoint, one_peace.modalities
        import one_peace.data.manifest, one_peace.data.shards, one_peace.data.demo
        import one_peace.train.trainer, one_peace.train.task, one_peace.train.batches
        forbidden = {FORBIDDEN!r}
        bad = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
        print(json.dumps({{"bad": bad, "shapes": [list(text.shape), list(image.shape), list(audio.shape)],
                           "after_import": len(after_import)}}))
    """
    out = _python(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bad"] == [], f"the inference surface imported {result['bad']}"
    assert result["shapes"][0][0] == 2 and result["shapes"][1][0] == 1 and result["shapes"][2][0] == 1


_BLOCK = """
import sys
for name in {names!r}:
    sys.modules[name] = None  # makes `import name` fail and find_spec return None, as if not installed
"""


def test_missing_fairseq2_extra_fails_at_start_naming_the_extra(tmp_path):
    """Training needs no fairseq2; ``data.backend=fairseq2`` without it: one clear message before any work."""
    code = _BLOCK.format(names=["fairseq2", "fairseq2n"]) + textwrap.dedent(
        """
        sys.argv = ["one_peace.run", "recipe=vl_seq2seq", "output_dir=out", "hydra.run.dir=.", "data.backend=fairseq2"]
        import one_peace.run
        one_peace.run.main()
        """
    )
    out = _python(code, tmp_path)
    assert out.returncode != 0
    assert "the 'fairseq2' extra" in out.stderr, out.stderr[-2000:]
    assert "pip install 'one-peace[fairseq2]'" in out.stderr
    assert not (tmp_path / "out" / "demo_data").exists(), "the command did work before failing"
    # the loader itself says the same when constructed directly; the default backend needs nothing more
    code = _BLOCK.format(names=["fairseq2", "fairseq2n"]) + textwrap.dedent(
        """
        from one_peace.extras import MissingExtraError
        from one_peace.data import LoaderConfig, MultimodalLoader
        from one_peace.tokenizer import train_tokenizer
        tok = train_tokenizer(["a b c"] * 4, vocab_size=260)
        rows = [{"text": "a b"}, {"text": "c"}]
        loader = MultimodalLoader(rows, tokenizer=tok, config=LoaderConfig(batch_size=2, num_workers=1))
        print("BATCHES:", len(list(loader)))
        loader.close()
        try:
            MultimodalLoader(rows, tokenizer=tok, config=LoaderConfig(batch_size=1, backend="fairseq2"))
        except MissingExtraError as exc:
            print("MISSING:", exc)
        """
    )
    out = _python(code, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "BATCHES: 1" in out.stdout and "MISSING:" in out.stdout and "'fairseq2' extra" in out.stdout, out.stdout


def test_missing_video_extra_names_the_extra(tmp_path):
    code = _BLOCK.format(names=["av"]) + textwrap.dedent(
        """
        from one_peace.adapters.video import load_video_frames
        from one_peace.extras import MissingExtraError
        try:
            load_video_frames("clip.mp4", 4)
        except MissingExtraError as exc:
            print("MISSING:", exc)
        """
    )
    out = _python(code, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install 'one-peace[video]'" in out.stdout, out.stdout


def _task(seed: int = 0) -> Task:
    torch.manual_seed(seed)
    model = one_peace.build_model("tiny", modalities=("text", "image"))
    return Task(model, {"c": (ContrastiveObjective(("image", "text")), 1.0)})


def _batches(model: one_peace.OnePeaceModel, n: int = 3) -> list[dict]:
    out = []
    for i in range(n):
        batch = one_peace.example_inputs(("text", "image"), batch_size=4, config=model.config, seed=i)
        batch["valid"] = torch.ones(4, dtype=torch.bool)
        out.append(batch)
    return out


class _Killed(Exception):
    pass


def test_trainer_trains_from_in_memory_batches_and_resumes_exactly(tmp_path):
    """No fairseq2 needed: a BatchList drives the trainer; a crash after a checkpoint + resume == an unbroken run."""
    cfg = dict(max_steps=5, batch_size=4, save_every=2, log_every=1, warmup_steps=1, lr=1e-3)
    task = _task()
    source = BatchList(_batches(task.model), shuffle=True, seed=3)
    assert isinstance(source, BatchSource)
    straight = Trainer(task, source, TrainerConfig(**cfg), tmp_path / "a")
    final = straight.fit()
    assert final == latest_checkpoint(tmp_path / "a") and straight.step == 5
    assert straight.epoch == 1 and source.epoch == 1  # 5 steps over 3 batches: the second epoch is under way
    reference = {k: v.clone() for k, v in task.state_dict().items()}

    task = _task()
    source = BatchList(_batches(task.model), shuffle=True, seed=3)
    crashing = Trainer(task, source, TrainerConfig(**cfg), tmp_path / "b")
    real_save = crashing.save

    def save_then_crash():  # fault injection: the process dies right after the step-4 checkpoint lands
        path = real_save()
        if crashing.step == 4:
            raise _Killed
        return path

    crashing.save = save_then_crash  # type: ignore[method-assign]
    with pytest.raises(_Killed):
        crashing.fit()

    task = _task(seed=99)  # different init: everything must come from the checkpoint
    source = BatchList(_batches(task.model), shuffle=True, seed=3)
    resumed = Trainer(task, source, TrainerConfig(**cfg, resume=True), tmp_path / "b")
    resumed.fit()
    assert resumed.step == 5
    for k, v in task.state_dict().items():
        assert torch.equal(v, reference[k]), k
    lines = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines][-1] == 5
    loaded = one_peace.load(final)
    assert loaded.config.embed_dim == task.model.config.embed_dim


def test_batch_source_that_yields_nothing_is_an_error_not_a_hang(tmp_path):
    class Empty:
        def __iter__(self):
            return iter(())

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    trainer = Trainer(_task(), Empty(), TrainerConfig(max_steps=2), tmp_path)
    with pytest.raises(RuntimeError, match="yielded no batch"):
        trainer.fit()


def test_batch_list_resumes_mid_epoch_in_the_same_order():
    batches = list(range(7))
    a = BatchList(batches, shuffle=True, seed=1)
    first = list(a)
    it = iter(a)
    head = [next(it) for _ in range(3)]
    b = BatchList(batches, shuffle=True, seed=1)
    b.load_state_dict(a.state_dict())
    rest = list(b)
    second = head + rest
    assert sorted(first) == batches and sorted(second) == batches and first != second  # reshuffled per epoch
    assert b.epoch == 2
    with pytest.raises(ValueError, match="position"):
        b.load_state_dict({"epoch": 0, "position": 99})


def test_trainer_without_tensorboard_and_matplotlib_finishes_with_one_warning_each(tmp_path):
    code = _BLOCK.format(names=["matplotlib", "tensorboard"]) + textwrap.dedent(
        """
        import warnings, torch, one_peace
        from one_peace.train.batches import BatchList
        from one_peace.train.objectives import ContrastiveObjective
        from one_peace.train.task import Task
        from one_peace.train.trainer import Trainer, TrainerConfig
        model = one_peace.build_model("tiny", modalities=("text", "image"))
        task = Task(model, {"c": (ContrastiveObjective(("image", "text")), 1.0)})
        batch = one_peace.example_inputs(("text", "image"), batch_size=2, config=model.config)
        batch["valid"] = torch.ones(2, dtype=torch.bool)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ckpt = Trainer(task, BatchList([batch]), TrainerConfig(max_steps=3, log_every=1), "run").fit()
        skipped = sorted(str(w.message).split(" skipped")[0] for w in caught if "skipped" in str(w.message))
        print("CKPT", ckpt.is_dir(), skipped)
        """
    )
    out = _python(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CKPT True ['TensorBoard logging', 'the loss plot (loss.png)']" in out.stdout, out.stdout
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and not (tmp_path / "run" / "loss.png").exists()
