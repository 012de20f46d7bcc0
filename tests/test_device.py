"""#14 (part) Device placement and precision: where training tensors are created, trainer.device/precision, caches."""

from __future__ import annotations

import warnings

import pytest
import torch

import one_peace
from one_peace.models import relpos
from one_peace.train.batches import BatchList
from one_peace.train.device import move_batch, resolve_device, resolve_precision
from one_peace.train.objectives import ContrastiveObjective, DenoiseObjective
from one_peace.train.task import Task
from one_peace.train.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.core
OPTIONS = {"image": {"image_size": 32}, "audio": {"frontend": "fbank", "feature_dim": 32}}


def _objectives_task() -> Task:
    from one_peace.models.decoder import DecoderConfig, DenoiseDecoder

    torch.manual_seed(0)
    model = one_peace.build_model("tiny", modalities=("text", "image", "audio"), modality_options=OPTIONS)
    mods = ("text", "image", "audio")
    decoder = DenoiseDecoder(
        DecoderConfig(encoder_dim=64, embed_dim=32, layers=1, heads=2, ffn_dim=64, modalities=mods)
    )
    objectives = {
        "contrast": (ContrastiveObjective(("image", "text")), 1.0),
        "image": (DenoiseObjective("image"), 1.0),
        "audio": (DenoiseObjective("audio"), 1.0),  # span masking
        "text": (DenoiseObjective("text"), 1.0),  # whole-word masking (every token a word: no tokenizer here)
    }
    return Task(model, objectives, decoder=decoder)


def _seq2seq_task() -> tuple[torch.nn.Module, dict]:
    from one_peace.tokenizer import train_tokenizer
    from one_peace.train.instructions import Instruction
    from one_peace.train.seq2seq_task import Seq2SeqTask

    tok = train_tokenizer(["a red circle", "caption:"], 280)
    model = one_peace.build_model(
        "tiny",
        modalities=("image", "text"),
        modality_options={"image": {"image_size": 32}, "text": {"vocab_size": tok.vocab_size}},
    )
    task = Seq2SeqTask(
        model, tok, Instruction("[IMAGE:image,mask_ratio=0.5] caption: -> [TEXT:cap]"), {"embed_dim": 32}
    )
    batch = {
        "image": one_peace.example_inputs(("image",), 2, model.config)["image"],
        "valid": torch.ones(2, dtype=torch.bool),
        "raw": {"cap": ["a red circle", "a circle"], "image": ["x", "y"]},
    }
    return task, batch


def _task_and_batch(kind: str) -> tuple[torch.nn.Module, dict]:
    """A contrastive + denoising task (text, image, audio) or a seq2seq task, with one batch for it."""
    if kind == "seq2seq":
        return _seq2seq_task()
    task = _objectives_task()
    batch = one_peace.example_inputs(("text", "image", "audio"), 4, task.model.config)
    batch["valid"] = torch.ones(4, dtype=torch.bool)
    return task, batch


def _clear_caches() -> None:
    relpos._bucket_1d.cache_clear()
    relpos._bucket_2d.cache_clear()
    relpos._on_device.cache_clear()


@pytest.mark.parametrize("kind", ["objectives", "seq2seq"])
def test_a_training_step_creates_no_tensor_on_the_default_device(kind):
    """With the default device set to ``meta``, any tensor training code creates without naming a device lands on
    ``meta`` and the first op mixing it with the CPU model fails: so the step proves every one names its device."""
    task, batch = _task_and_batch(kind)
    task.train()
    _clear_caches()  # the relative-index caches are filled inside the step, too
    with torch.device("meta"):
        loss, _ = task(batch)
        loss.backward()
    assert loss.device.type == "cpu" and torch.isfinite(loss)
    grads = [p.grad for p in task.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.device.type == "cpu" for g in grads)


def test_device_and_precision_resolution_and_the_deprecated_aliases():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(ValueError, match=r"trainer\.device must be auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    cpu = torch.device("cpu")
    assert resolve_precision(None, cpu) == "fp32" and resolve_precision(None, torch.device("cuda")) == "bf16-autocast"
    with pytest.warns(DeprecationWarning, match="trainer.bf16 is deprecated"):
        assert resolve_precision(None, cpu, bf16=True) == "bf16-autocast"
    with pytest.warns(DeprecationWarning, match="trainer.mixed_precision is deprecated"):
        assert resolve_precision(None, cpu, mixed_precision="bf16") == "bf16-autocast"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert resolve_precision("fp32", cpu, bf16=True) == "fp32"  # the new key wins
    with pytest.raises(ValueError, match=r"trainer\.precision must be one of"):
        resolve_precision("int8", cpu)
    with pytest.raises(ValueError, match=r"trainer.precision must be one of .* or null"):
        TrainerConfig(precision="half").validate()


def test_move_batch_follows_nesting_and_copies_nothing_on_the_same_device():
    t = torch.ones(2)
    batch = {"a": {"b": t, "c": [t, (t, "x")]}, "ids": ["s1"], "n": 3}
    moved = move_batch(batch, torch.device("cpu"))
    assert moved["a"]["b"] is t and moved["a"]["c"][1][0] is t and moved["ids"] == ["s1"] and moved["n"] == 3
    meta = move_batch(batch, torch.device("meta"))
    assert meta["a"]["c"][0].device.type == "meta" and meta["a"]["c"][1][1] == "x"


def test_relative_index_caches_hand_out_copies():
    a = relpos.bucket_1d(9, 8)
    a.fill_(0)
    assert relpos.bucket_1d(9, 8).max() > 0  # the cache was not changed through the returned tensor
    b = relpos.bucket_2d(3, 3, 4, "cpu")
    assert b.data_ptr() != relpos.bucket_2d(3, 3, 4, "cpu").data_ptr()


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16", "fp16"])
def test_the_trainer_trains_on_the_cpu_in_every_precision(tmp_path, precision):
    torch.manual_seed(0)
    # no layer scale: at 1e-6 every embedding starts equal, and in pure bf16 the contrastive gradient is then exactly 0
    model = one_peace.build_model(
        "tiny", modalities=("text", "image"), modality_options={"image": {"image_size": 32}}, layer_scale_init=0.0
    )
    task = Task(model, {"c": (ContrastiveObjective(("image", "text")), 1.0)})
    batches = []
    for i in range(2):
        b = one_peace.example_inputs(("text", "image"), 4, model.config, seed=i)
        b["valid"] = torch.ones(4, dtype=torch.bool)
        batches.append(b)
    cfg = TrainerConfig(max_steps=3, batch_size=4, save_every=3, log_every=1, warmup_steps=1, precision=precision)
    trainer = Trainer(task, BatchList(batches), cfg, tmp_path / precision)
    assert trainer.device == torch.device("cpu") and trainer.precision == precision
    before = {k: v.detach().clone() for k, v in task.state_dict().items()}
    trainer.fit()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.history)
    assert any(not torch.equal(before[k], v) for k, v in task.state_dict().items())
    dtype = next(task.model.parameters()).dtype
    assert dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    if precision == "fp16":
        state = torch.load(
            tmp_path / precision / "checkpoints" / "step_0000003" / "training_state" / "rank0.pt", weights_only=True
        )
        assert state["scaler"] is not None and state["scaler"]["scale"] > 0  # the scaler resumes with the run


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["objectives", "seq2seq"])
def test_one_bf16_training_step_on_cuda(tmp_path, kind):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    task, batch = _task_and_batch(kind)
    cfg = TrainerConfig(max_steps=1, batch_size=4, save_every=1, log_every=1, warmup_steps=0, device="cuda")
    trainer = Trainer(task, BatchList([batch]), cfg, tmp_path)
    assert trainer.precision == "bf16-autocast" and next(task.parameters()).device.type == "cuda"
    trainer.fit()
    assert torch.isfinite(torch.tensor(trainer.history[-1]["loss"]))


def _fsdp2_one_rank(tmp_path, device: str) -> None:
    """FSDP2 over a 1-rank process group: trains, writes DCP resume state and gathered safetensors weights, and
    follows the unsharded run's loss curve."""
    import socket

    import torch.distributed as dist
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    curves = {}
    plain_task_keys: set[str] = set()
    for mode in ("plain", "fsdp2"):
        task, batch = _task_and_batch("objectives")
        cfg = TrainerConfig(
            max_steps=2, batch_size=4, save_every=2, log_every=1, warmup_steps=0, device=device, distributed="ddp"
        )
        if mode == "fsdp2":
            backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
            cfg.distributed = "fsdp2"
        try:
            trainer = Trainer(task, BatchList([batch]), cfg, tmp_path / mode)
            assert trainer.sharded == (mode == "fsdp2")
            last = trainer.fit()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        curves[mode] = [h["loss"] for h in trainer.history]
        task_keys = set(load_file(str(last / "task.safetensors"))) if (last / "task.safetensors").exists() else set()
        if mode == "fsdp2":
            assert (last / "training_state" / "dcp").is_dir()
            weights = load_file(str(last / "model.safetensors"))
            assert weights and all(torch.isfinite(v.float()).all() for v in weights.values())
            assert task_keys and task_keys == plain_task_keys  # the task's own modules (decoders) are written too
        else:
            plain_task_keys = task_keys
    assert all(abs(a - b) < 1e-2 * max(1.0, abs(b)) for a, b in zip(curves["fsdp2"], curves["plain"])), curves


@pytest.mark.slow
def test_fsdp2_on_one_rank_on_the_cpu(tmp_path):
    _fsdp2_one_rank(tmp_path, "cpu")


@pytest.mark.gpu
def test_fsdp2_on_one_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _fsdp2_one_rank(tmp_path, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "flex-compiled", "xformers"])
def test_attention_backends_agree_with_sdpa_on_cuda(backend):
    """On CUDA in fp32: FlexAttention (eager and compiled) and xformers give SDPA's outputs on a fused, padded,
    token-dropped batch and (flex) on packed rows."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend == "xformers":
        pytest.importorskip("xformers.ops", reason="xformers does not import here")
    torch.manual_seed(0)
    model = one_peace.build_model("tiny", modalities=("text", "image"), modality_options={"image": {"image_size": 64}})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos_table" in name:
                p.normal_(0, 0.5)
    model = model.cuda().eval()
    inputs = one_peace.example_inputs(("text", "image"), 3, model.config)
    inputs = {m: {k: v.cuda() for k, v in b.items()} for m, b in inputs.items()}
    inputs["text"]["tokens"][0, -3:] = 1
    keep = {"image": torch.tensor([[0, 1, 3, 5], [0, 2, 4, -1], [0, 6, 7, 8]], device="cuda")}
    with torch.no_grad():
        want = model(inputs, keep).hidden
        want_packed = model.forward_packed("text", inputs["text"], row_length=64)
        model.set_attn_backend("xformers" if backend == "xformers" else "flex")
        run = torch.compile(model, fullgraph=True) if backend == "flex-compiled" else model
        got = run(inputs, keep).hidden
        packed = model.forward_packed("text", inputs["text"], row_length=64) if backend == "flex" else None
    for m in want:
        torch.testing.assert_close(got[m], want[m], atol=2e-4, rtol=2e-4)
    if packed is not None:
        torch.testing.assert_close(packed.hidden, want_packed.hidden, atol=2e-4, rtol=2e-4)


def test_ddp_looks_for_unused_parameters_only_when_a_step_can_leave_some_unused():
    """``Task.leaves_parameters_unused`` (DDP's ``find_unused_parameters``) is False only when a step reaches every
    parameter: checked by a backward that gives every parameter a gradient; True when the model has a modality
    that no view uses (and then some parameter really gets none)."""
    task, batch = _task_and_batch("objectives")  # text, image, audio: contrastive image-text + denoising of each
    assert task.leaves_parameters_unused  # the audio head: no objective embeds audio
    task.objectives["contrast_audio"] = ContrastiveObjective(("audio", "text"))
    task.weights["contrast_audio"] = 1.0
    for layer in task.model.layers:  # layer scale off would zero some gradients exactly; use a real one
        layer.gamma_1.data.fill_(0.5)
        layer.gamma_2.data.fill_(0.5)
    assert not task.leaves_parameters_unused
    task.train()
    loss, _ = task(batch)
    loss.backward()
    missing = [n for n, p in task.named_parameters() if p.grad is None]
    assert not missing, missing
    torch.manual_seed(0)
    model = one_peace.build_model("tiny", modalities=("text", "image", "audio"), modality_options=OPTIONS)
    partial = Task(model, {"c": (ContrastiveObjective(("image", "text")), 1.0)})
    assert partial.leaves_parameters_unused
    loss, _ = partial({m: batch[m] for m in ("text", "image")} | {"valid": batch["valid"]})
    loss.backward()
    assert any(p.grad is None for n, p in partial.named_parameters() if ".audio" in n)


def test_a_non_finite_loss_stops_training_before_any_checkpoint_holds_it(tmp_path):
    """The non-finite-loss check is a device flag read at log and save steps: the run stops at the first such step
    after the bad one, names the bad step, and writes no checkpoint of the diverged weights."""

    class Diverging(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Linear(2, 1)
            self.calls = 0

        def forward(self, batch):
            self.calls += 1
            loss = self.model(batch["x"]).square().mean()
            if self.calls == 2:
                loss = loss * float("nan")
            return loss, {"loss": loss.detach()}

    cfg = TrainerConfig(max_steps=6, batch_size=2, save_every=3, log_every=3, warmup_steps=0, device="cpu")
    trainer = Trainer(Diverging(), BatchList([{"x": torch.ones(2, 2)}]), cfg, tmp_path)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 1 \(detected at step 3\)"):
        trainer.fit()
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_a_training_step_reads_no_device_value_on_the_host():
    """The whole step of a contrastive + denoising task (text, image, audio: random, whole-word and span masking,
    the decoder, both losses, the backward) runs with the model and the batch on the ``meta`` device, whose tensors
    hold no values: any ``.item()``, ``bool(tensor)``, ``.tolist()`` or boolean indexing of a device tensor would
    raise. Masking reads only the host copy of the batch the trainer hands over (``HostBatch``)."""
    from one_peace.train.device import HOST_KEY, HostBatch

    task, batch = _task_and_batch("objectives")
    batch["text"]["tokens"][0, -2:] = 1  # padded text rows (the collator's mask says so)
    batch["text"]["padding_mask"][0, -2:] = True
    reference = task(dict(batch, **{HOST_KEY: HostBatch(batch)}))[1]  # on the CPU: host and adapter masks agree
    assert float(reference["loss"]) > 0
    task.to("meta")
    meta = move_batch(batch, torch.device("meta"))
    meta[HOST_KEY] = HostBatch(batch)
    _clear_caches()
    loss, logs = task(meta)
    loss.backward()
    assert loss.device.type == "meta" and all(v.device.type == "meta" for v in logs.values() if torch.is_tensor(v))
    assert all(p.grad is not None for n, p in task.named_parameters() if n.startswith("model.layers."))


def test_unused_parameter_search_follows_what_the_plugin_declares_not_its_class():
    """It used to recognise the built-in plugin classes by module: a copy of the image plugin from another package
    forced ``find_unused_parameters`` on, and no plugin could opt out. Now each plugin declares
    ``uses_all_parameters``."""
    from one_peace.adapters.image import ImageModality

    from one_peace import registry

    class CopiedImage(ImageModality):  # another package's plugin with the image adapter: it declares the same
        name = "copied_image"

    class Cautious(ImageModality):
        name = "cautious_image"
        uses_all_parameters = False

    for cls in (CopiedImage, Cautious):
        registry.register_modality(cls)
    try:
        for name, expected in (("copied_image", False), ("cautious_image", True)):
            torch.manual_seed(0)
            model = one_peace.build_model(
                "tiny", modalities=("text", name), modality_options={name: {"image_size": 32}}
            )
            task = Task(model, {"c": (ContrastiveObjective((name, "text")), 1.0)})
            assert task.leaves_parameters_unused is expected, name
    finally:
        for cls in (CopiedImage, Cautious):
            registry.unregister(cls.name)
