"""The modality conformance suite: ``check_modality(name)`` runs a plugin through every path the library takes it.

Plugin authors call it from their own tests (``assert check_modality("motion").ok``); our tests sweep it over
:func:`~one_peace.registry.list_modalities`, outside plugins included. Each check builds on the plugin's own
``example_inputs`` / ``example_samples`` / ``example_batch`` through a tiny model (CPU, seconds) and a failure
names the hook at fault (``FAILED [build_preprocessor]: ...``):

- ``options``: the typed options build and pass ``validate_options``; an unknown key and a value of the wrong type
  are refused naming the plugin;
- ``inputs`` (from ``example_inputs``): every value passes ``check_value`` and ``resolve`` and the preprocessor;
- ``estimate_length``: the header estimate is within 10% (or 2 tokens) of the token count the adapter makes;
- ``loader``: a manifest of the inputs goes through the real loader (the default engine, one worker process) with no
  bad sample, giving the batch ``collate`` gives;
- ``presentation``: ``media_types``, ``preview`` and ``describe_preprocessing`` (JSON-friendly) answer;
- ``forward_backward``: every parameter of the modality (adapter, its FFN in every layer, final LayerNorm, head)
  receives a finite, non-zero gradient;
- ``position_padding``: the padding the plugin tells from the host batch is the adapter's own mask;
- ``host_reads``: the adapter's forward (and, with ``position_padding``, a whole denoising step) runs on the
  ``meta`` device, where any ``.item()``, ``bool(tensor)`` or ``.tolist()`` would raise;
- ``masking``: the policy masks about ``ratio`` of the valid positions, never CLS or padding;
- ``denoise``: a denoising training step (the task's masking, the decoder, the loss, the backward) is finite;
- ``keep_ids``: token dropping keeps exactly the kept positions, and keeping all of them changes nothing;
- ``collate`` and ``padding``: samples of different lengths collate into one batch, and an item's embedding
  does not depend on the padding its batch-mates add (skipped for fixed-length modalities);
- ``fused``: the modality fuses with the language modality in one sequence (and attends to it);
- ``decoder``: the pretraining (denoising) decoder predicts every position of the modality;
- ``save_load``: a checkpoint folder round trip (with the plugin's record) gives the same embeddings, and
  ``encode`` of the raw inputs on the loaded model gives the embeddings of the preprocessed batch;
- ``compile`` (``compile=True`` only): ``torch.compile`` matches eager.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from one_peace.registry import ModalityPlugin, PluginOptionError, PluginOptions, get_plugin, list_modalities
from one_peace.tokenizer import LANGUAGE


class ConformanceError(AssertionError):
    """One or more conformance checks failed; the message lists each with its reason."""


@dataclass
class ConformanceReport:
    """What :func:`check_modality` found.

    Attributes:
        modality: The modality checked.
        source: Where its plugin came from.
        results: Check name -> ``"ok"``, ``"skipped: <why>"`` or ``"FAILED [<hook>]: <why>"``.
        seconds: Check name -> how long a passing check took.
    """

    modality: str
    source: str
    results: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No check failed."""
        return not self.failures()

    def failures(self) -> dict[str, str]:
        """The failed checks and why."""
        return {k: v for k, v in self.results.items() if v.startswith("FAILED")}

    def __str__(self) -> str:
        lines = [f"conformance of {self.modality!r} ({self.source}):"]
        lines += [f"  {k:<17} {v}" for k, v in self.results.items()]
        return "\n".join(lines)


class _Skip(Exception):
    """A check that does not apply to this modality (the message says why)."""


class _Hook(Exception):
    """A plugin hook raised (or returned something wrong): the report names the hook."""

    def __init__(self, hook: str, error: str) -> None:
        super().__init__(f"{hook}: {error}")
        self.hook, self.error = hook, error


def _call(hook: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call one plugin hook; whatever it raises is reported under its name."""
    try:
        return fn(*args)
    except _Skip:
        raise
    except Exception as exc:
        raise _Hook(hook, f"{type(exc).__name__}: {exc}") from exc


def _small_options(plugin: ModalityPlugin) -> dict[str, Any]:
    """Options that keep the tiny model fast: small images and vocabularies where the plugin has such options."""
    names = plugin.Options().keys()
    out: dict[str, Any] = {}
    if "image_size" in names:
        out["image_size"] = 32
    if "vocab_size" in names:
        out["vocab_size"] = 512
    if "feature_dim" in names:
        out["feature_dim"] = 64
    return out


def _config(modalities: list[str], options: Mapping[str, Mapping[str, Any]] | None) -> Any:
    from one_peace.config import model_config
    from one_peace.models.encoder import resolve_modalities

    plugins = resolve_modalities(modalities)
    opts = {p.name: _small_options(p) for p in plugins}
    for m, o in (options or {}).items():
        opts.setdefault(m, {}).update(o)
    # no layer scale: every layer acts at full strength, so a padding leak or a missing fusion shows at once
    return model_config(
        "tiny", [p.name for p in plugins], modality_options={k: v for k, v in opts.items() if v}, layer_scale_init=0.0
    )


def _batch(plugin: ModalityPlugin, config: Any, size: int, seed: int) -> dict[str, Any]:
    return plugin.example_batch(config, size, torch.Generator().manual_seed(seed))


def _valid(model: Any, name: str, batch: Mapping[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out = model.adapters[name](batch)
    pad = out.padding_mask
    return ~pad if pad is not None else torch.ones(out.tokens.shape[:2], dtype=torch.bool)


def _embeddings(model: Any, name: str, batch: Mapping[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out = model.forward_features({name: batch})
        return model.embed(name, out.hidden[name])  # type: ignore[no-any-return]


def check_modality(
    name: str,
    *,
    compile: bool = False,
    batch_size: int = 3,
    seed: int = 0,
    modality_options: Mapping[str, Mapping[str, Any]] | None = None,
    raise_on_failure: bool = True,
) -> ConformanceReport:
    """Run the conformance checks (module docstring) for the registered modality ``name``.

    Args:
        name: A registered modality.
        compile: Also check ``torch.compile`` against eager (slow: off by default).
        batch_size: Samples per example batch (>= 2: padding needs batch-mates).
        seed: Seed of the example batches and the model.
        modality_options: Options of the tiny model's modalities (default: the plugin's, with small images).
        raise_on_failure: Raise :class:`ConformanceError` listing every failed check (else only report them).

    Raises:
        KeyError: ``name`` is not registered.
        ConformanceError: a check failed (with ``raise_on_failure``).
    """
    from one_peace.models.encoder import OnePeaceModel

    plugin = get_plugin(name)
    report = ConformanceReport(name, plugin.source)
    torch.manual_seed(seed)
    try:
        config = _config([name], modality_options)
        model = OnePeaceModel(config)
    except Exception as exc:  # options refused, or the adapter does not build: nothing else can run
        hook = "Options / validate_options" if isinstance(exc, PluginOptionError) else "build_adapter"
        report.results["options" if hook.startswith("Options") else "forward_backward"] = (
            f"FAILED [{hook}]: {type(exc).__name__}: {exc}"
        )
        report.results["model"] = "FAILED: the tiny model does not build; no other check ran"
        if raise_on_failure:
            raise ConformanceError(str(report)) from exc
        return report
    tmp = tempfile.TemporaryDirectory(prefix="one-peace-conformance-")
    state: dict[str, Any] = {"model": model, "config": config, "folder": Path(tmp.name)}
    if plugin.needs_tokenizer:  # a tokenizer trained here; the model's vocabulary is the tokenizer's
        try:
            tokenizer = _tokenizer(plugin, config)
        except _Hook as exc:
            report.results["tokenizer"] = f"FAILED [{exc.hook}]: {exc.error}"
        else:
            if "vocab_size" in plugin.defaults:
                options = {k: dict(v) for k, v in (modality_options or {}).items()}
                options.setdefault(name, {})["vocab_size"] = tokenizer.vocab_size
                torch.manual_seed(seed)
                config = _config([name], options)
                model = OnePeaceModel(config)
            model.tokenizer = tokenizer
            state.update(model=model, config=config)
    a = (plugin, state, batch_size, seed)

    checks: list[tuple[str, str, Callable[[], None]]] = [
        ("options", "Options / validate_options", lambda: _check_options(plugin)),
        ("inputs", "example_inputs", lambda: _check_inputs(*a)),
        ("estimate_length", "estimate_length", lambda: _check_estimate(*a)),
        ("loader", "build_preprocessor / collate", lambda: _check_loader(*a)),
        ("presentation", "media_types / preview / describe_preprocessing", lambda: _check_presentation(*a)),
        ("forward_backward", "build_adapter", lambda: _check_grad(*a)),
        ("position_padding", "position_padding", lambda: _check_position_padding(*a)),
        ("host_reads", "build_adapter (forward)", lambda: _check_host_reads(*a)),
        ("masking", "masking / word_starts", lambda: _check_masking(*a)),
        ("denoise", "masking / decoder_position_embed", lambda: _check_denoise(*a)),
        ("keep_ids", "build_adapter (keep_ids)", lambda: _check_keep_ids(*a)),
        ("collate", "collate / padding / token_lengths", lambda: _check_collate(*a)),
        ("padding", "collate / build_adapter (padding)", lambda: _check_padding(*a)),
        ("fused", "build_adapter", lambda: _check_fused(plugin, modality_options, batch_size, seed)),
        ("decoder", "decoder_positions / decoder_position_embed", lambda: _check_decoder(*a)),
        ("save_load", "record / options", lambda: _check_save_load(*a)),
    ]
    if compile:
        checks.append(("compile", "build_adapter", lambda: _check_compile(*a)))
    try:
        for check, hook, fn in checks:
            try:
                started = time.perf_counter()
                fn()
                report.results[check] = "ok"
                report.seconds[check] = time.perf_counter() - started
            except _Skip as why:
                report.results[check] = f"skipped: {why}"
            except _Hook as exc:  # a failure inside one named hook
                report.results[check] = f"FAILED [{exc.hook}]: {exc.error}"
            except Exception as exc:  # every failure is reported, not only the first
                report.results[check] = f"FAILED [{hook}]: {type(exc).__name__}: {exc}"
    finally:
        tmp.cleanup()
    if raise_on_failure and not report.ok:
        raise ConformanceError(str(report))
    return report


def check_all(**kwargs: Any) -> dict[str, ConformanceReport]:
    """:func:`check_modality` for every registered modality (reports only; nothing raises)."""
    return {m: check_modality(m, raise_on_failure=False, **kwargs) for m in list_modalities()}


# ------------------------------------------------------------------------------------------------- checks
def _check_options(plugin: ModalityPlugin) -> None:
    opts: PluginOptions = _call("Options / validate_options", plugin.parse_options, {})
    assert isinstance(opts, PluginOptions) and dataclasses.is_dataclass(opts), "options must be a PluginOptions"
    assert opts.as_dict() == plugin.defaults, f"defaults {plugin.defaults} disagree with the options {opts}"
    try:
        plugin.parse_options({"no_such_option__": 1})
    except PluginOptionError as exc:
        assert plugin.name in str(exc) and "no_such_option__" in str(exc), f"the error must name both: {exc}"
    else:
        raise AssertionError("an unknown option key was accepted")
    typed = [k for k, v in plugin.defaults.items() if isinstance(v, int | float | str) and not isinstance(v, bool)]
    for key in typed[:1]:
        wrong: Any = [] if not isinstance(plugin.defaults[key], list) else "x"
        try:
            plugin.parse_options({key: wrong})
        except PluginOptionError as exc:
            assert key in str(exc), f"the error must name the option: {exc}"
        else:
            raise AssertionError(f"option {key!r} accepted a value of the wrong type ({wrong!r})")


_SENTENCES = [
    "a dog runs across the green field",
    "two children watch a red kite in the sky",
    "the quick brown fox jumps over the lazy dog",
    "rain falls on the quiet city at night",
]


def _tokenizer(plugin: ModalityPlugin, config: Any) -> Any:
    vocab = int(plugin.options(config).get("vocab_size", 512))
    return _call("train_tokenizer", plugin.train_tokenizer, _SENTENCES * 4, vocab)


def _inputs(plugin: ModalityPlugin, state: dict[str, Any], n: int, seed: int) -> dict[str, Any]:
    """The plugin's example inputs, checked, resolved and preprocessed (once per suite run)."""
    if "inputs" in state:
        if isinstance(state["inputs"], _Skip):
            raise _Skip(str(state["inputs"]))
        if isinstance(state["inputs"], Exception):
            raise _Skip(f"the inputs failed (see 'inputs'): {state['inputs']}")
        return state["inputs"]  # type: ignore[no-any-return]
    folder = state["folder"] / "inputs"
    folder.mkdir(exist_ok=True)
    try:
        values = _call(
            "example_inputs", plugin.example_inputs, state["config"], folder, n, torch.Generator().manual_seed(seed)
        )
        if values is None:
            raise _Skip("the plugin has no example_inputs()")
        if not isinstance(values, list) or len(values) != n:
            raise _Hook("example_inputs", f"returned {type(values).__name__} of {len(values or [])}, not {n} values")
        config = state["config"]
        prep = _call("build_preprocessor", plugin.build_preprocessor, config, state["model"].tokenizer)
        resolved, samples = [], []
        for i, value in enumerate(values):
            row = {plugin.name: value}
            resolved.append(_call("check_value / resolve", plugin.read_field, row, plugin.name, folder))
            sample = _call("build_preprocessor", prep, resolved[-1])
            if not isinstance(sample, dict):
                raise _Hook("build_preprocessor", f"input {i} gave {type(sample).__name__}, not a sample dict")
            samples.append(sample)
    except (_Skip, _Hook) as exc:
        state["inputs"] = exc
        raise
    state["inputs"] = {"values": values, "resolved": resolved, "samples": samples, "prep": prep, "folder": folder}
    return state["inputs"]  # type: ignore[no-any-return]


def _check_inputs(plugin: ModalityPlugin, state: dict[str, Any], batch_size: int, seed: int) -> None:
    got = _inputs(plugin, state, batch_size, seed)
    batch = _call("collate", plugin.collate, got["samples"])
    with torch.no_grad():
        out = state["model"].adapters[plugin.name](batch)
    assert out.tokens.shape[0] == batch_size, f"{batch_size} inputs gave {out.tokens.shape[0]} rows"


def _token_count(model: Any, plugin: ModalityPlugin, sample: dict[str, Any]) -> int:
    with torch.no_grad():
        out = model.adapters[plugin.name](plugin.collate([sample]))
    pad = out.padding_mask
    return int(out.tokens.shape[1] - (int(pad.sum()) if pad is not None else 0))


def _check_estimate(plugin: ModalityPlugin, state: dict[str, Any], batch_size: int, seed: int) -> None:
    if type(plugin).estimate_length is ModalityPlugin.estimate_length:
        raise _Skip("not implemented: every row falls in the first length bucket")
    got = _inputs(plugin, state, batch_size, seed)
    for value, resolved, sample in zip(got["values"], got["resolved"], got["samples"], strict=True):
        est = _call("estimate_length", plugin.estimate_length, resolved, state["config"], got["prep"])
        if not isinstance(est, int) or isinstance(est, bool) or est < 1:
            raise _Hook("estimate_length", f"returned {est!r} for {str(value)[:60]!r}, not a positive int")
        real = _token_count(state["model"], plugin, sample)
        if abs(est - real) > max(2, 0.1 * real):
            raise _Hook(
                "estimate_length", f"estimated {est} tokens for {str(value)[:60]!r}; the adapter makes {real} (CLS in)"
            )


def _check_loader(plugin: ModalityPlugin, state: dict[str, Any], batch_size: int, seed: int) -> None:
    import json

    from one_peace.data.loader import LoaderConfig, MultimodalLoader

    got = _inputs(plugin, state, batch_size, seed)
    manifest = got["folder"] / "conformance.jsonl"
    try:
        lines = [json.dumps({"id": f"s{i}", plugin.name: v}) for i, v in enumerate(got["values"])]
    except TypeError:
        raise _Skip("the example inputs are not JSON values (no manifest can hold them)") from None
    manifest.write_text("\n".join(lines) + "\n")
    loader = MultimodalLoader(
        manifest,
        fields={plugin.name: plugin.name},
        model_config=state["config"],
        tokenizer=state["model"].tokenizer,
        config=LoaderConfig(batch_size=batch_size, num_workers=1, shuffle_window=0),
    )
    batches = list(loader)
    if loader.total_bad:
        raise _Hook("build_preprocessor", f"the loader skipped {loader.total_bad} inputs: {dict(loader.bad_reasons)}")
    assert len(batches) == 1 and int(batches[0]["valid"].sum()) == batch_size, "the loader lost inputs"
    want = plugin.collate(got["samples"])
    for key, tensor in want.items():
        have = batches[0][plugin.name].get(key)
        if not (isinstance(have, torch.Tensor) and have.shape == tensor.shape and torch.equal(have, tensor)):
            raise _Hook("collate", f"the loader's (worker process) batch differs from collate()'s in {key!r}")


def _check_presentation(plugin: ModalityPlugin, state: dict[str, Any], batch_size: int, seed: int) -> None:
    import io
    import json

    from one_peace.media import MediaTypes, Preview

    types = _call("media_types", plugin.media_types)
    if not isinstance(types, MediaTypes):
        raise _Hook("media_types", f"returned {type(types).__name__}, not a MediaTypes")
    desc = _call("describe_preprocessing", plugin.describe_preprocessing, state["config"])
    if not isinstance(desc, dict) or desc.get("modality") != plugin.name:
        raise _Hook("describe_preprocessing", "must return a dict whose 'modality' is the plugin's name")
    try:
        json.dumps(desc)
    except (TypeError, ValueError) as exc:
        raise _Hook("describe_preprocessing", f"not JSON-friendly: {exc}") from None
    try:
        got = _inputs(plugin, state, batch_size, seed)
    except _Skip:
        return
    for value in got["values"]:
        if (
            plugin.media
            and isinstance(value, str)
            and Path(value).suffix
            and types.extensions
            and not types.accepts(value)
        ):
            raise _Hook("media_types", f"does not accept the plugin's own example input {value!r}")
    preview = _call("preview", plugin.preview, got["resolved"][0], state["config"], 64)
    if preview is None:
        return
    if not isinstance(preview, Preview) or not preview.data or "/" not in preview.mime_type:
        raise _Hook("preview", f"must return a Preview with a MIME type and bytes, got {preview!r}"[:200])
    if preview.mime_type == "image/png":
        from PIL import Image

        with Image.open(io.BytesIO(preview.data)) as image:
            if max(image.size) > 64:
                raise _Hook("preview", f"a thumbnail of {image.size} exceeds max_size=64")


def _check_position_padding(plugin: ModalityPlugin, state: dict[str, Any], batch_size: int, seed: int) -> None:
    model = state["model"]
    batches = [_batch(plugin, state["config"], batch_size, seed)]
    samples = plugin.example_samples(state["config"], batch_size, torch.Generator().manual_seed(seed))
    if samples is not None:
        batches.append(plugin.collate(samples))
    for batch in batches:
        try:
            claimed = plugin.position_padding(batch)
        except NotImplementedError:
            raise _Skip(
                "not implemented: denoising reads the adapter's mask from the device (one read per view)"
            ) from None
        except Exception as exc:
            raise _Hook("position_padding", f"{type(exc).__name__}: {exc}") from exc
        with torch.no_grad():
            out = model.adapters[plugin.name](batch)
        shape = tuple(out.tokens.shape[:2])
        own = out.padding_mask if out.padding_mask is not None else torch.zeros(shape, dtype=torch.bool)
        told = torch.zeros(shape, dtype=torch.bool) if claimed is None else claimed.bool()
        if tuple(told.shape) != shape:
            raise _Hook("position_padding", f"has shape {tuple(told.shape)}; the adapter makes {shape} positions")
        if not torch.equal(told, own):
            raise _Hook(
                "position_padding",
                f"marks {int(told.sum())} padded positions where the adapter pads {int(own.sum())} "
                f"(rows {sorted({int(r) for r in (told != own).nonzero()[:, 0]})})",
            )


def _check_host_reads(plugin: ModalityPlugin, state: dict[str, Any], batch_size: int, seed: int) -> None:
    from one_peace.models.encoder import OnePeaceModel
    from one_peace.train.device import move_batch

    config = state["config"]
    batch = _batch(plugin, config, batch_size, seed)
    with torch.device("meta"):
        meta_model = OnePeaceModel(config)
    meta = move_batch(batch, torch.device("meta"))
    try:
        with torch.no_grad():
            meta_model.adapters[plugin.name](meta)
    except Exception as exc:
        raise _Hook(
            "build_adapter",
            "the adapter's forward reads a device value on the host (.item(), bool(tensor), .tolist(), boolean "
            f"indexing or a Python branch on a tensor: use padding_or_none / host_checks): {type(exc).__name__}: {exc}",
        ) from exc
    try:
        plugin.position_padding(batch)
    except NotImplementedError:
        return  # denoising then reads the adapter's mask: the step is not meant to run without host reads
    if not plugin.decoder:
        return
    task = _denoise_task(plugin, meta_model, seed)
    task.to("meta")
    from one_peace.train.device import HOST_KEY, HostBatch

    valid = torch.ones(batch_size, dtype=torch.bool)
    loss, _ = task({plugin.name: meta, "valid": valid, HOST_KEY: HostBatch({plugin.name: batch})})
    loss.backward()


def _denoise_task(plugin: ModalityPlugin, model: Any, seed: int) -> Any:
    from one_peace.models.decoder import DecoderConfig, DenoiseDecoder
    from one_peace.train.objectives import DenoiseObjective
    from one_peace.train.task import Task

    decoder = DenoiseDecoder(
        DecoderConfig(
            encoder_dim=model.config.embed_dim, embed_dim=32, layers=1, heads=2, ffn_dim=64, modalities=(plugin.name,)
        )
    )
    return Task(model, {"denoise": (DenoiseObjective(plugin.name), 1.0)}, decoder=decoder, seed=seed)


def _check_denoise(plugin: ModalityPlugin, state: dict[str, Any], batch_size: int, seed: int) -> None:
    from one_peace.train.device import HOST_KEY, HostBatch

    if not plugin.decoder:
        raise _Skip("no decoder branch (decoder = False)")
    model = state["model"].train()
    task = _denoise_task(plugin, model, seed)
    samples = plugin.example_samples(state["config"], batch_size, torch.Generator().manual_seed(seed))
    batch = plugin.collate(samples) if samples is not None else _batch(plugin, state["config"], batch_size, seed)
    try:
        valid = torch.ones(batch_size, dtype=torch.bool)
        loss, _ = task({plugin.name: batch, "valid": valid, HOST_KEY: HostBatch({plugin.name: batch})})
        loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    assert torch.isfinite(loss), f"non-finite denoising loss {float(loss)}"


def _check_grad(plugin: ModalityPlugin, state: dict[str, Any], batch_size: int, seed: int) -> None:
    model = state["model"].train()
    model.zero_grad(set_to_none=True)
    batch = _batch(plugin, state["config"], batch_size, seed)
    out = model.forward_features({plugin.name: batch})
    hidden = out.hidden[plugin.name]
    assert hidden.dim() == 3 and hidden.shape[0] == batch_size, f"hidden has shape {tuple(hidden.shape)}"
    assert torch.isfinite(hidden).all(), "non-finite hidden states"
    emb = model.embed(plugin.name, hidden)
    loss = (emb * torch.randn_like(emb)).sum() + hidden.pow(2).mean()
    loss.backward()
    params = dict(model.named_parameters())
    names = model.parameter_groups(plugin.name)
    assert names, "the modality owns no parameters"
    missing = [n for n in names if params[n].grad is None]
    assert not missing, f"parameters without a gradient: {missing[:8]}"
    bad = [n for n in names if not torch.isfinite(params[n].grad).all()]
    assert not bad, f"non-finite gradients: {bad[:8]}"
    zero = [n for n in names if not params[n].grad.any()]
    assert not zero, f"parameters whose gradient is all zero (unused?): {zero[:8]}"
    model.zero_grad(set_to_none=True)
    model.eval()


def _check_masking(plugin: ModalityPlugin, state: dict[str, Any], batch_size: int, seed: int) -> None:
    from one_peace.train.masking import keep_ids_from_mask, mask_for

    model = state["model"]
    batch = _batch(plugin, state["config"], batch_size, seed)
    valid = _valid(model, plugin.name, batch)
    mask = mask_for(plugin, valid, batch, None, torch.Generator().manual_seed(seed))
    assert mask.shape == valid.shape and mask.dtype == torch.bool, f"mask {tuple(mask.shape)} {mask.dtype}"
    assert not mask[:, 0].any(), "CLS was masked"
    assert not (mask & ~valid).any(), "padding was masked"
    n = (valid.sum(1) - 1).clamp(min=1).float()
    got = mask.sum(1).float() / n
    ratio = plugin.masking.ratio
    assert (got - ratio).abs().max() <= max(0.2, 2.0 / float(n.min())), f"masked {got.tolist()}, policy {ratio}"
    keep = keep_ids_from_mask(mask, valid)
    with torch.no_grad():
        out = model.forward_features({plugin.name: batch}, keep_ids={plugin.name: keep})
    assert out.hidden[plugin.name].shape[1] == keep.shape[1], "the masked view's length is not the kept count"


def _check_keep_ids(plugin: ModalityPlugin, state: dict[str, Any], batch_size: int, seed: int) -> None:
    model = state["model"].eval()
    batch = _batch(plugin, state["config"], batch_size, seed)
    valid = _valid(model, plugin.name, batch)
    t = valid.shape[1]
    with torch.no_grad():
        full = model.forward_features({plugin.name: batch}).hidden[plugin.name]
        every = torch.arange(t).expand(batch_size, t).clone()
        same = model.forward_features({plugin.name: batch}, keep_ids={plugin.name: every}).hidden[plugin.name]
    torch.testing.assert_close(same, full, atol=1e-5, rtol=1e-4, msg="keeping every position changed the output")
    if t < 3:
        raise _Skip(f"sequences of {t} tokens leave nothing to drop")
    keep = torch.full((batch_size, (t + 1) // 2), -1, dtype=torch.long)
    for b in range(batch_size):
        pos = valid[b].nonzero().flatten()[::2]  # CLS (0) and every other valid position
        keep[b, : len(pos)] = pos[: keep.shape[1]]
    with torch.no_grad():
        out = model.forward_features({plugin.name: batch}, keep_ids={plugin.name: keep})
    hidden = out.hidden[plugin.name]
    assert hidden.shape[:2] == keep.shape, f"dropped view is {tuple(hidden.shape)}, kept {tuple(keep.shape)}"
    assert torch.isfinite(hidden[keep >= 0]).all(), "non-finite states at kept positions"


def _samples(plugin: ModalityPlugin, config: Any, n: int, seed: int) -> list[dict[str, Any]]:
    samples = plugin.example_samples(config, n, torch.Generator().manual_seed(seed))
    if samples is None:
        raise _Skip("the plugin has no example_samples()")
    return samples


def _check_collate(plugin: ModalityPlugin, state: dict[str, Any], batch_size: int, seed: int) -> None:
    samples = _samples(plugin, state["config"], batch_size, seed)
    batch = plugin.collate(samples)
    pad = plugin.padding(batch)
    if pad is None:
        raise _Skip("fixed length (no padding)")
    lengths = plugin.token_lengths(batch)
    assert len(lengths) == len(samples), f"{len(lengths)} lengths for {len(samples)} samples"
    assert len(set(lengths)) > 1, f"example_samples should differ in length (got {lengths})"
    alone = [plugin.token_lengths(plugin.collate([s]))[0] for s in samples]
    assert lengths == alone, f"lengths in a batch {lengths} differ from each sample's own {alone}"


def _check_padding(plugin: ModalityPlugin, state: dict[str, Any], batch_size: int, seed: int) -> None:
    model = state["model"].eval()
    samples = _samples(plugin, state["config"], batch_size, seed)
    batch = plugin.collate(samples)
    if plugin.padding(batch) is None:
        raise _Skip("fixed length (no padding)")
    together = _embeddings(model, plugin.name, batch)
    for i, s in enumerate(samples):
        alone = _embeddings(model, plugin.name, plugin.collate([s]))[0]
        torch.testing.assert_close(
            together[i], alone, atol=1e-4, rtol=1e-4, msg=f"sample {i}'s embedding depends on its batch's padding"
        )


def _check_fused(
    plugin: ModalityPlugin, options: Mapping[str, Mapping[str, Any]] | None, batch_size: int, seed: int
) -> None:
    from one_peace.models.encoder import OnePeaceModel

    if plugin.name == LANGUAGE:
        raise _Skip("it is the language modality")
    if LANGUAGE not in list_modalities():
        raise _Skip(f"no {LANGUAGE!r} modality registered")
    torch.manual_seed(seed)
    config = _config([plugin.name, LANGUAGE], options)
    model = OnePeaceModel(config).eval()
    batch = _batch(plugin, config, batch_size, seed)
    words = _batch(get_plugin(LANGUAGE), config, batch_size, seed + 1)
    with torch.no_grad():
        fused = model.forward_features({plugin.name: batch, LANGUAGE: words})
        alone = model.forward_features({plugin.name: batch}).hidden[plugin.name]
    h = fused.hidden[plugin.name]
    assert h.shape == alone.shape, f"fused states {tuple(h.shape)} vs alone {tuple(alone.shape)}"
    assert fused.hidden[LANGUAGE].shape[0] == batch_size
    assert not torch.allclose(h, alone), "the fused sequence does not attend across modalities"


def _check_decoder(plugin: ModalityPlugin, state: dict[str, Any], batch_size: int, seed: int) -> None:
    from one_peace.models.decoder import DecoderConfig, DenoiseDecoder
    from one_peace.train.masking import keep_ids_from_mask, mask_for

    if not plugin.decoder:
        raise _Skip("no decoder branch (decoder = False)")
    model = state["model"].eval()
    d = model.config.embed_dim
    decoder = DenoiseDecoder(
        DecoderConfig(encoder_dim=d, embed_dim=32, layers=1, heads=2, ffn_dim=64, modalities=(plugin.name,))
    )
    batch = _batch(plugin, state["config"], batch_size, seed)
    valid = _valid(model, plugin.name, batch)
    mask = mask_for(plugin, valid, batch, None, torch.Generator().manual_seed(seed))
    keep = keep_ids_from_mask(mask, valid)
    with torch.no_grad():
        student = model.forward_features({plugin.name: batch}, keep_ids={plugin.name: keep})
        pred = decoder(student.hidden, {plugin.name: keep}, {plugin.name: ~valid}, {plugin.name: valid.shape[1]})
    assert pred[plugin.name].shape == (batch_size, valid.shape[1], d), f"prediction {tuple(pred[plugin.name].shape)}"
    assert torch.isfinite(pred[plugin.name]).all()


def _check_save_load(plugin: ModalityPlugin, state: dict[str, Any], batch_size: int, seed: int) -> None:
    import json

    from one_peace.checkpoint import load, save
    from one_peace.models.encoding import encode

    model = state["model"].eval()
    batch = _batch(plugin, state["config"], batch_size, seed)
    before = _embeddings(model, plugin.name, batch)
    folder = save(model, state["folder"] / "ckpt")
    record = json.loads((folder / "config.json").read_text()).get("plugins", {}).get(plugin.name)
    want = _call("record", plugin.record, model.config)
    if record != json.loads(json.dumps(want)):
        raise _Hook("record", f"config.json holds {record!r}, the plugin's record is {want!r}")
    again = load(folder).eval()
    assert plugin.options(again.config) == plugin.options(model.config), "options changed in the round trip"
    torch.testing.assert_close(_embeddings(again, plugin.name, batch), before, msg="embeddings changed")
    try:
        got = _inputs(plugin, state, batch_size, seed)
    except _Skip:
        return
    expected = torch.nn.functional.normalize(_embeddings(again, plugin.name, plugin.collate(got["samples"])), dim=-1)
    encoded = encode(again, plugin.name, got["resolved"], batch_size=batch_size)
    torch.testing.assert_close(
        encoded, expected, atol=1e-4, rtol=1e-4, msg="encode() of the raw inputs differs from the preprocessed batch"
    )


def _check_compile(plugin: ModalityPlugin, state: dict[str, Any], batch_size: int, seed: int) -> None:
    model = state["model"].eval()
    batch = _batch(plugin, state["config"], batch_size, seed)
    eager = _embeddings(model, plugin.name, batch)
    compiled: Any = torch.compile(model)
    with torch.no_grad():
        got = compiled.embed(plugin.name, compiled.forward_features({plugin.name: batch}).hidden[plugin.name])
    torch.testing.assert_close(got, eager, atol=1e-4, rtol=1e-4, msg="compiled output differs from eager")
