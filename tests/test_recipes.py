"""Recipes through the Hydra entry point: smoke runs, freezing, checkpoints, and kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file

from one_peace.run import run
from one_peace.train.trainer import latest_checkpoint

SMALL = [
    "data.demo_train=32",
    "data.demo_valid=16",
    "data.image_size=32",
    "trainer.batch_size=8",
    "trainer.log_every=2",
    "data.vocab_size=300",
]


def _cfg(recipe: str, out: Path, *overrides: str):
    with initialize_config_module(config_module="one_peace.recipes", version_base=None):
        return compose(config_name="config", overrides=[f"recipe={recipe}", f"output_dir={out}", *SMALL, *overrides])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


#: recipes that must learn in a short run: extra overrides, the retrieval direction checked, the factor over chance
#: (vl_contrastive's learning is checked in test_retrieval.py, with evaluation, embedding and search after it)
LEARNS = {
    "al_contrastive": (
        ["model.modality_options.audio.frontend=fbank", "model.modality_options.audio.feature_dim=64"],
        "text->audio",
        2.5,  # 4 sound classes: chance R@1 is ~0.28, so at most ~3.6x
    ),
    "pretrain_vl": ([], "text->image", 3.0),
}


@pytest.mark.parametrize("recipe", ["vl_contrastive", "al_contrastive", "pretrain_vl"])
def test_recipe_smoke(tmp_path, recipe):
    """4 steps for the layout of a run; the recipes meant to learn run 100 steps and must beat chance retrieval."""
    extra, direction, factor = LEARNS.get(recipe, ([], None, 0.0))
    steps = 100 if direction else 4
    cfg = _cfg(recipe, tmp_path, f"trainer.max_steps={steps}", f"trainer.save_every={steps // 2}", *extra)
    cfg.trainer.log_every = steps // 2
    if direction:
        cfg.data.demo_train, cfg.data.demo_valid, cfg.trainer.batch_size, cfg.trainer.warmup_steps = 64, 32, 16, 10
    results = run(cfg)
    ckpt = Path(results["checkpoint"])
    assert ckpt.name == f"step_{steps:07d}" and (ckpt / "COMPLETE").is_file()
    assert any(k.endswith("/R@1") for k in results)
    if direction:
        assert results[f"{direction}/R@1"] >= factor * results[f"{direction}/chance@1"], results
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [steps // 2, steps] and (tmp_path / "loss.png").is_file()
    import one_peace

    assert one_peace.load(ckpt).encode("text", ["a red circle"]).shape == (1, 64)


@pytest.mark.parametrize("recipe", ["pretrain_al", "add_modality"])
def test_frozen_parameters_stay_bitwise_unchanged(tmp_path, recipe):
    run(_cfg(recipe, tmp_path, "trainer.max_steps=1", "trainer.save_every=1", "trainer.keep_last=5"))
    first = _weights(tmp_path / "checkpoints" / "step_0000001")
    run(
        _cfg(
            recipe,
            tmp_path,
            "trainer.max_steps=3",
            "trainer.save_every=1",
            "trainer.keep_last=5",
            "trainer.resume=true",
        )
    )
    last = _weights(tmp_path / "checkpoints" / "step_0000003")
    changed = {k for k in first if not torch.equal(first[k], last[k])}
    assert changed, "nothing trained"
    trainable = ["adapters.audio.", ".ffns.audio.", "final_norms.audio.", "heads.audio."]
    if recipe == "pretrain_al":  # its recipe also trains the temperature (and the decoder, not in these weights)
        trainable.append("logit_scale")
    assert all(any(t in k for t in trainable) for k in changed), sorted(changed)[:5]
    assert ("logit_scale" in changed) == (recipe == "pretrain_al")
    assert any(k.startswith("layers.0.attn.") for k in first)  # the shared backbone exists and stayed frozen


def test_vl_seq2seq_short_run_generates_captions(tmp_path):
    """... and its checkpoints record what they were trained for: used for retrieval, the captioner warns (#29)."""
    import warnings

    import one_peace
    from one_peace import embed as embed_mod

    results = run(_cfg("vl_seq2seq", tmp_path, "trainer.max_steps=3"))
    assert {"token_f1", "baseline_token_f1", "examples"} <= set(results)
    assert all(isinstance(e["generated"], str) for e in results["examples"])
    ckpt = Path(results["checkpoint"])
    trained = json.loads((ckpt / "config.json").read_text())["trained"]
    assert {k: trained[k] for k in ("recipe", "uses")} == {"recipe": "vl_seq2seq", "uses": ["generation"]}
    assert trained["generators"]["vl_seq2seq"]["prefix"] == "decoder."  # what generation needs (test_generate.py)
    assert one_peace.load(ckpt).trained_with == {"recipe": "vl_seq2seq", "uses": ["generation"]}
    valid = tmp_path / "demo_data" / "valid.jsonl"
    cfg = embed_mod.EmbedConfig(checkpoint=str(ckpt), data=str(valid), modality="image", out=str(tmp_path / "emb"))
    cfg.progress, cfg.index, cfg.workers = False, "none", 0
    with pytest.warns(UserWarning, match="trained by recipe 'vl_seq2seq' for generation, not for retrieval: its"):
        embed_mod.embed(cfg)
    contrastive = one_peace.build_model("tiny", modalities=("text",))
    contrastive.trained_with = {"recipe": "vl_contrastive", "uses": ["retrieval"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from one_peace.checkpoint import warn_unless_trained_for

        assert not warn_unless_trained_for(contrastive, "retrieval", "here")


def test_half_written_checkpoint_is_never_the_latest(tmp_path):
    root = tmp_path / "checkpoints"
    good = root / "step_0000002"
    good.mkdir(parents=True)
    (good / "COMPLETE").write_text("2\n")
    (root / ".step_0000004.tmp-abc").mkdir()  # interrupted write
    (root / "step_0000003").mkdir()  # no COMPLETE marker
    assert latest_checkpoint(tmp_path) == good


def _kill_and_resume(tmp_path: Path, *overrides: str) -> None:
    """SIGKILL after the step-3 checkpoint, resume, and compare with an uninterrupted run at step 6."""
    args = [
        sys.executable,
        "-m",
        "one_peace.run",
        "recipe=pretrain_vl",
        *SMALL,
        "trainer.max_steps=6",
        "trainer.save_every=3",
        "trainer.keep_last=5",
        "data.num_workers=2",  # decoding worker processes, prefetching ahead of what the loop consumed
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run([*args, f"output_dir={ref}"], check=True, capture_output=True, env=env, timeout=600)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*args, f"output_dir={out}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while not (out / "checkpoints" / "step_0000003" / "COMPLETE").is_file():
        assert time.time() < deadline and proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "step_0000006").exists()
    subprocess.run(
        [*args, f"output_dir={out}", "trainer.resume=true"], check=True, capture_output=True, env=env, timeout=600
    )
    a, b = _weights(ref / "checkpoints" / "step_0000006"), _weights(out / "checkpoints" / "step_0000006")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ta = load_file(str(ref / "checkpoints" / "step_0000006" / "task.safetensors"))
    tb = load_file(str(out / "checkpoints" / "step_0000006" / "task.safetensors"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6] and all("data_wait" in r and "mfu" in r for r in rows)


def test_killed_run_resumes_to_bitwise_identical_weights(tmp_path):
    """2 decoding workers and length buckets (several epochs of 2-3 batches): the resume position is what the loop
    consumed, whatever the workers had prefetched."""
    _kill_and_resume(tmp_path, "data.length_buckets=[10,13,20]", "data.remainder=pad")


@pytest.mark.slow
def test_killed_run_on_shards_resumes_to_bitwise_identical_weights(tmp_path):
    """The same from WebDataset shards (rows addressed as shard members)."""
    from one_peace.data.demo import make_demo_dataset
    from one_peace.data.shards import write_shards

    paths = make_demo_dataset(tmp_path / "data", n_train=32, n_valid=16, image_size=32, video=False)
    write_shards(paths["train"], tmp_path / "shards", shard_size=10)
    _kill_and_resume(tmp_path, f"data.train={tmp_path / 'shards'}", f"data.valid={paths['valid']}")


def test_too_many_bad_samples_saves_the_last_step_and_resumes_exactly_with_a_higher_limit(tmp_path):
    """7 corrupt images in 100 rows (7 % > the 1 % limit): the run stops at the end of the epoch with the bad rows'
    reasons and how to go on, after saving its last completed step (it used to stop with a traceback and nothing
    saved). Resumed with a higher limit it ends bitwise where an unbroken run with that limit ends."""
    from one_peace.data.demo import make_demo_dataset
    from one_peace.data.loader import TooManyBadSamples

    paths = make_demo_dataset(tmp_path / "data", n_train=100, n_valid=16, image_size=32, video=False)
    rows = [json.loads(x) for x in paths["train"].read_text().splitlines()]
    for row in rows[3:100:14]:  # 7 rows
        (tmp_path / "data" / row["image"]).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    data = [f"data.train={paths['train']}", f"data.valid={paths['valid']}", "trainer.max_steps=16"]
    data += ["trainer.save_every=100", "data.shuffle_window=0", "data.num_workers=0", "trainer.log_every=4"]
    with pytest.raises(TooManyBadSamples) as err:
        run(_cfg("vl_contrastive", tmp_path / "stopped", *data))
    message = str(err.value)
    assert "7 of 96 distinct samples were bad (7.3% > 1.0%" in message  # 12 full batches of 8 read
    assert "undecodable image" in message
    assert "data.max_bad_fraction" in message and "trainer.resume=true" in message
    ckpt = tmp_path / "stopped" / "checkpoints" / "step_0000012"  # 12 batches of 8 in the epoch, all trained
    assert f"the last completed step 12 was saved to {ckpt}" in message and (ckpt / "COMPLETE").is_file()
    assert len(err.value.bad_rows) == 7
    higher = [*data, "data.max_bad_fraction=0.1"]
    run(_cfg("vl_contrastive", tmp_path / "stopped", *higher, "trainer.resume=true"))
    run(_cfg("vl_contrastive", tmp_path / "unbroken", *higher))
    a = _weights(tmp_path / "stopped" / "checkpoints" / "step_0000016")
    b = _weights(tmp_path / "unbroken" / "checkpoints" / "step_0000016")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_ddp_matches_the_single_process_loss_curve(tmp_path):
    """One 2-process torchrun (gloo, CPU) launch: DDP training with 2 accumulated micro-batches (no gradient
    communication before the last), per-rank resume state, rank-0 outputs; the same loss curve as one process."""
    common = [
        "recipe=vl_contrastive",
        *SMALL,
        "trainer.max_steps=4",
        "trainer.log_every=1",
        "data.shuffle_window=0",
        "model.layer_scale_init=0.1",
        "trainer.accumulation=2",
    ]
    comm = tmp_path / "comm.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ONE_PEACE_COMM_LOG": str(comm)}
    ddp = tmp_path / "ddp"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "-m",
            "one_peace.run",
            *common,
            "trainer.batch_size=4",
            f"output_dir={ddp}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # accumulation: no gradient communication before the last micro-step of each optimizer step (a DDP comm hook
    # counts the all-reduce calls per micro-step on every rank)
    for rank in (0, 1):
        calls = [json.loads(x) for x in Path(f"{comm}.rank{rank}").read_text().splitlines()]
        assert len(calls) == 8 and {c["micro"] for c in calls} == {0, 1}, calls
        assert all(c["allreduce_calls"] == 0 for c in calls if c["micro"] == 0), calls
        assert all(c["allreduce_calls"] > 0 for c in calls if c["micro"] == 1), calls
    single = tmp_path / "single"
    run(_cfg("vl_contrastive", single, *common[len(SMALL) + 1 :], "trainer.batch_size=8"))
    curve = [json.loads(x)["loss"] for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x)["loss"] for x in (single / "metrics.jsonl").read_text().splitlines()]
    assert len(curve) == len(ref) == 4 and len(set(round(v, 3) for v in ref)) > 1
    assert all(abs(a - b) < 1e-4 for a, b in zip(curve, ref)), (curve, ref)
    ckpt = ddp / "checkpoints" / "step_0000004"
    assert (ckpt / "training_state" / "rank0.pt").is_file() and (ckpt / "training_state" / "rank1.pt").is_file()
    assert json.loads((ddp / "eval.json").read_text())["checkpoint"] == str(ckpt.resolve())


@pytest.mark.slow
def test_trainer_compile_follows_the_eager_loss_curve(tmp_path):
    """trainer.compile=true (each shared layer compiled in place): the eager run's losses, and checkpoints under
    the eager names (one_peace.load opens them)."""
    import one_peace

    common = ["trainer.max_steps=4", "trainer.log_every=1", "data.shuffle_window=0", "data.num_workers=0"]
    run(_cfg("vl_contrastive", tmp_path / "eager", *common))
    results = run(_cfg("vl_contrastive", tmp_path / "compiled", *common, "trainer.compile=true"))
    curves = [
        [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("eager", "compiled")
    ]
    assert len(curves[0]) == 4 and all(abs(a - b) < 1e-4 for a, b in zip(*curves)), curves
    a, b = _weights(tmp_path / "eager" / "checkpoints" / "step_0000004"), _weights(Path(results["checkpoint"]))
    assert a.keys() == b.keys() and one_peace.load(results["checkpoint"]).encode("text", ["a red circle"]).shape


@pytest.mark.slow
def test_two_process_torchrun_exits_0_thirty_times_in_a_row(tmp_path):
    """The abort at exit ("terminate called without an active exception") came in 3 of 30 two-process gloo runs
    while a process group outlived destroy_process_group(); 30 launches in a row must all exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for i in range(30):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "one_peace.run"]
        cmd += ["recipe=vl_contrastive", *SMALL, "trainer.max_steps=2", "trainer.batch_size=4", "data.num_workers=0"]
        cmd += [f"output_dir={tmp_path / str(i)}", "eval.max_samples=8"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, f"launch {i}: exit {res.returncode}\n{res.stderr[-3000:]}"
        assert "terminate called" not in res.stderr


@pytest.mark.slow
def test_torchrun_fsdp2_matches_single_process_and_resumes_bitwise(tmp_path):
    """2-process FSDP2: the loss curve of 1 process, DCP resume state, gathered safetensors weights."""
    common = [
        "recipe=vl_contrastive",
        *SMALL,
        "trainer.log_every=1",
        "data.shuffle_window=0",
        "model.layer_scale_init=0.1",
        "trainer.save_every=2",
        "trainer.keep_last=5",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(out: Path, *extra: str) -> None:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "-m",
            "one_peace.run",
            *common,
            "trainer.batch_size=4",
            "trainer.distributed=fsdp2",
            f"output_dir={out}",
            *extra,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]

    launch(tmp_path / "full", "trainer.max_steps=4")
    single = tmp_path / "single"
    run(_cfg("vl_contrastive", single, *common[len(SMALL) + 1 :], "trainer.batch_size=8", "trainer.max_steps=4"))
    curve = [json.loads(x)["loss"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x)["loss"] for x in (single / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(a - b) < 1e-4 for a, b in zip(curve, ref)) and len(curve) == 4, (curve, ref)
    assert (tmp_path / "full" / "checkpoints" / "step_0000004" / "training_state" / "dcp").is_dir()
    launch(tmp_path / "resumed", "trainer.max_steps=2")
    launch(tmp_path / "resumed", "trainer.max_steps=4", "trainer.resume=true")
    a = _weights(tmp_path / "full" / "checkpoints" / "step_0000004")
    b = _weights(tmp_path / "resumed" / "checkpoints" / "step_0000004")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_vl_starts_from_an_official_pretraining_checkpoint(tmp_path, parity):
    """model.pretrained: official encoder weights and the official decoder keys are loaded into the recipe."""
    from one_peace.checkpoint.pretrain import decoder_from_official_state

    state = load_file(str(parity / "one_peace_tiny_state.safetensors"))
    extra = load_file(str(parity / "one_peace_tiny_pretrain_extra_state.safetensors"))
    path = tmp_path / "pretrain.pt"
    torch.save({"model": {**state, **extra}}, path)
    cfg = _cfg(
        "pretrain_vl",
        tmp_path / "out",
        "trainer.max_steps=1",
        f"model.pretrained={path}",
        f"model.bpe_dir={parity / 'bpe'}",
        "data.image_size=64",
    )
    results = run(cfg)
    task_state = load_file(str(Path(results["checkpoint"]) / "task.safetensors"))
    ref = decoder_from_official_state(extra, 64, heads=4)
    # one optimizer step moved the decoder a little from the official weights it started from
    diff = (task_state["decoder.positions.text"] - ref.positions["text"].detach()).abs().max()
    assert 0 < diff < 1e-2


def test_multitask_recipe_mixes_tasks_every_step_and_resumes(tmp_path):
    results = run(
        _cfg("multitask_demo", tmp_path, "trainer.max_steps=2", "trainer.save_every=1", "trainer.keep_last=5")
    )
    assert set(results) >= {"caption", "align", "checkpoint"}
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all({"caption/seq2seq/loss", "align/contrastive/loss", "loss"} <= set(x) for x in lines)
    for x in lines:  # weighted sum: 1.0 * caption + 0.5 * align
        assert abs(x["loss"] - (x["caption/loss"] + 0.5 * x["align/loss"])) < 1e-4
    again = run(
        _cfg(
            "multitask_demo",
            tmp_path,
            "trainer.max_steps=3",
            "trainer.save_every=1",
            "trainer.keep_last=5",
            "trainer.resume=true",
        )
    )
    assert again["checkpoint"].endswith("step_0000003")


def test_grounding_and_closed_set_recipes(tmp_path):
    grounding = run(_cfg("vl_grounding", tmp_path / "g", "trainer.max_steps=2"))
    assert {"mean_iou", "acc@0.5", "baseline_mean_iou"} <= set(grounding) and grounding["samples"] == 16
    closed = run(_cfg("vl_classify", tmp_path / "c", "trainer.max_steps=2"))
    from one_peace.data.manifest import iter_manifest

    allowed = {row["caption"] for _, row in iter_manifest(tmp_path / "c" / "demo_data" / "train.jsonl")}
    assert closed["examples"] and all(e["generated"] in allowed for e in closed["examples"])


def test_mask_ratio_attribute_drops_source_tokens(tmp_path):
    from one_peace.adapters.text import TextTokenizer

    import one_peace
    from one_peace.train.instructions import Instruction
    from one_peace.train.seq2seq_task import Seq2SeqTask

    tok = TextTokenizer.train(["a red circle", "caption:"], vocab_size=280)
    model = one_peace.build_model(
        "tiny",
        modalities=("image", "text"),
        modality_options={"image": {"image_size": 64}, "text": {"vocab_size": tok.vocab_size}},
    )
    task = Seq2SeqTask(
        model, tok, Instruction("[IMAGE:image,mask_ratio=0.5] caption: -> [TEXT:cap]"), {"embed_dim": 32}
    )
    batch = {
        "image": one_peace.example_inputs(("image",), 2, model.config)["image"],
        "valid": torch.ones(2, dtype=torch.bool),
        "raw": {"cap": ["a red circle", "a red circle"], "image": ["x", "y"]},
    }
    lengths = []
    hook = model.layers[0].register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    task.train()
    task(batch)
    task.eval()
    task.generate(batch, max_len=3)
    hook.remove()
    assert lengths[0] < lengths[1] and lengths[1] - lengths[0] == 8  # 8 of 16 patches dropped in training only


def _cli(out: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    args = ["recipe=vl_contrastive", f"output_dir={out}", "hydra.run.dir=" + str(out), *SMALL, *overrides]
    return subprocess.run(
        [sys.executable, "-m", "one_peace.run", *args], capture_output=True, text=True, timeout=timeout, cwd=out.parent
    )


def test_output_dir_holding_another_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    """#10.2: a fresh run used to prune its own new checkpoints in favour of an older run's higher steps."""
    out = tmp_path / "run"
    run(_cfg("vl_contrastive", out, "trainer.max_steps=4", "trainer.save_every=2"))  # the old run: step 4
    refused = _cli(out, "trainer.max_steps=2")
    assert refused.returncode != 0
    assert "holds another run (checkpoints, metrics.jsonl)" in refused.stderr, refused.stderr[-2000:]
    assert "trainer.resume=true" in refused.stderr and "overwrite=true" in refused.stderr
    assert latest_checkpoint(out).name == "step_0000004"  # untouched
    fresh = _cli(out, "trainer.max_steps=2", "overwrite=true")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "overwrite=true: moved the previous run" in fresh.stdout
    printed = Path(fresh.stdout.split("checkpoint: ")[-1].strip().splitlines()[0])
    assert printed.is_dir() and printed == latest_checkpoint(out) and printed.name == "step_0000002"
    (aside,) = out.glob("previous-*")
    assert (aside / "checkpoints" / "step_0000004" / "COMPLETE").is_file()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2]  # the new run's metrics only


def test_a_second_run_into_a_locked_output_dir_is_refused_naming_the_holder(tmp_path):
    """#10.3: the lock is an OS lock (flock): held here by this process, as a live run would hold it."""
    import fcntl

    from one_peace.runner.outputs import LOCK_NAME

    out = tmp_path / "run"
    out.mkdir()
    with open(out / LOCK_NAME, "w") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.write("424242\n")
        fh.flush()
        refused = _cli(out, "trainer.max_steps=1")
    assert refused.returncode != 0
    assert "is in use by another run (pid 424242)" in refused.stderr, refused.stderr[-2000:]
    assert not (out / "demo_data").exists()
    # released (the holder closed or was killed): the same command now runs, and says a resume found nothing
    ok = _cli(out, "trainer.max_steps=1", "trainer.resume=true")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "trainer.resume: no checkpoint in" in ok.stdout and "starting fresh" in ok.stdout


def test_seq2seq_with_sampled_templates_resumes_bitwise(tmp_path, monkeypatch):
    """#10.9: the `|||` template sampler and the mask_ratio generator are saved; a crash after the step-2 checkpoint
    (fault injection) and a resume reach exactly the uninterrupted run's weights."""
    import one_peace.train.trainer as trainer_module

    instruction = (
        "task.instruction='[IMAGE:image,mask_ratio=0.3] what does the image describe? -> [TEXT:caption] ||| "
        "[IMAGE:image,mask_ratio=0.3] caption it: -> [TEXT:caption]'"
    )
    common = ("trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_last=5", instruction)
    run(_cfg("vl_seq2seq", tmp_path / "ref", *common))
    real = trainer_module.save_checkpoint

    def crash_after_step_2(trainer):
        path = real(trainer)
        if trainer.step == 2:
            raise KeyboardInterrupt("injected crash")
        return path

    monkeypatch.setattr(trainer_module, "save_checkpoint", crash_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg("vl_seq2seq", tmp_path / "run", *common))
    monkeypatch.setattr(trainer_module, "save_checkpoint", real)
    run(_cfg("vl_seq2seq", tmp_path / "run", *common, "trainer.resume=true"))
    a = _weights(tmp_path / "ref" / "checkpoints" / "step_0000004")
    b = _weights(tmp_path / "run" / "checkpoints" / "step_0000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ta = load_file(str(tmp_path / "ref" / "checkpoints" / "step_0000004" / "task.safetensors"))
    tb = load_file(str(tmp_path / "run" / "checkpoints" / "step_0000004" / "task.safetensors"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_from_scratch_training_on_field_mapped_shards(tmp_path):
    """#10.10: shards of a field-mapped manifest (`img`) stored no media, and tokenizer training refused shards."""
    from one_peace.data.demo import make_demo_dataset
    from one_peace.data.loader import LoaderConfig, MultimodalLoader
    from one_peace.data.shards import write_shards

    paths = make_demo_dataset(tmp_path / "demo", 24, 8, image_size=32, video=False)
    for split in ("train", "valid"):
        rows = [json.loads(x) for x in paths[split].read_text().splitlines()]
        renamed = tmp_path / "demo" / f"{split}_img.jsonl"
        renamed.write_text("".join(json.dumps({**r, "img": r.pop("image")}) + "\n" for r in rows))
        write_shards(renamed, tmp_path / f"{split}_shards", shard_size=10, fields={"image": "img"})
    loader = MultimodalLoader(
        tmp_path / "train_shards", fields={"image": "img"}, config=LoaderConfig(batch_size=4, shuffle_window=0)
    )
    batches = list(loader)
    loader.close()
    assert loader.stats.bad_total == 0 and sum(int(b["valid"].sum()) for b in batches) == 24
    results = run(
        _cfg(
            "vl_contrastive",
            tmp_path / "out",
            f"data.train={tmp_path / 'train_shards'}",
            f"data.valid={tmp_path / 'valid_shards'}",
            "data.fields={image:img,text:caption}",
            "trainer.max_steps=2",
        )
    )
    assert Path(results["checkpoint"]).is_dir() and (tmp_path / "out" / "tokenizer.json").is_file()


def test_a_run_that_fails_releases_its_output_dir_lock(tmp_path):
    """The lock is released however run() ends, so a retry in the same process is not refused."""
    out = tmp_path / "run"
    (tmp_path / "empty").mkdir()  # exists (the up-front checks pass), holds no shard: found after the lock
    missing = [f"data.train={tmp_path / 'empty'}", f"data.valid={tmp_path / 'empty'}"]
    with pytest.raises(FileNotFoundError, match=r"no \.tar shards found in .*empty") as err:  # fails after the lock
        run(_cfg("vl_contrastive", out, *missing))
    assert err.traceback  # the failed run's frames stay alive here, as in a debugger or a retry loop
    import fcntl

    from one_peace.runner.outputs import lock_output_dir

    fh = lock_output_dir(out)  # would raise OutputDirInUse if the failed run still held it
    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    fh.close()


def test_two_process_torchrun_embed_equals_one_process(tmp_path):
    """Each rank embeds its own parts; rank 0 builds the index from all of them (full environment only: torch 2.14
    with gloo sometimes aborts at process exit after the work is done, see test_trainer's 2-process worker)."""
    from test_retrieval import _corpus, _embed

    import one_peace

    checkpoint = one_peace.save(one_peace.build_model("tiny", modalities=("image",)), tmp_path / "ck")

    manifest = _corpus(tmp_path / "data", 11, corrupt=(6,))
    single = tmp_path / "single"
    _embed(checkpoint, manifest, single, part_size=3)
    both = tmp_path / "both"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
        "one_peace.embed",
        f"checkpoint={checkpoint}",
        f"data={manifest}",
        "modality=image",
        f"out={both}",
        "part_size=3",
        "batch_size=4",
        "progress=false",
    ]
    got = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert got.returncode == 0, got.stderr[-3000:]
    from one_peace.retrieval import EmbeddingStore

    a, b = EmbeddingStore(single), EmbeddingStore(both)
    records = b.finished_parts()
    assert sorted(records) == [0, 1, 2, 3] and a.ids() == b.ids()
    np.testing.assert_allclose(a.vectors(), b.vectors(), atol=2e-3, rtol=0)
    assert [x["id"] for x in b.bad()] == ["item6"] and b.info()["index"]["recall_at_10"] == 1.0
