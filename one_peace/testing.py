"""The modality conformance suite: ``check_modality(name)`` runs every check the library relies on a plugin for.

Plugin authors call it from their own tests (``assert check_modality("motion").ok``); our tests sweep it over
:func:`~one_peace.registry.list_modalities`, outside plugins included. Each check builds on the plugin's own
``example_batch`` / ``example_samples`` through a tiny model (CPU, seconds):

- ``options``: the typed options build, and an unknown option key is refused naming the plugin;
- ``forward_backward``: forward and backward through the model; every parameter of the modality (adapter, its
  FFN in every layer, final LayerNorm, head) receives a finite, non-zero gradient;
- ``masking``: the plugin's masking policy masks about ``ratio`` of the valid positions, never CLS or padding;
- ``keep_ids``: token dropping keeps exactly the kept positions, and keeping all of them changes nothing;
- ``collate`` and ``padding``: samples of different lengths collate into one batch, and an item's embedding
  does not depend on the padding its batch-mates add (skipped for fixed-length modalities);
- ``fused``: the modality fuses with the language modality in one sequence (and attends to it);
- ``decoder``: the pretraining (denoising) decoder predicts every position of the modality;
- ``save_load``: a checkpoint folder round trip gives the same embeddings;
- ``compile`` (``compile=True`` only): ``torch.compile`` matches eager.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from one_peace.registry import ModalityPlugin, PluginOptionError, get_plugin, list_modalities
from one_peace.tokenizer import LANGUAGE


class ConformanceError(AssertionError):
    """One or more conformance checks failed; the message lists each with its reason."""


@dataclass
class ConformanceReport:
    """What :func:`check_modality` found.

    Attributes:
        modality: The modality checked.
        source: Where its plugin came from.
        results: Check name -> ``"ok"``, ``"skipped: <why>"`` or ``"FAILED: <why>"``.
    """

    modality: str
    source: str
    results: dict[str, str] = field(default_factory=dict)

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


def _small_options(plugin: ModalityPlugin) -> dict[str, Any]:
    """Options that keep the tiny model fast: small images and vocabularies where the plugin has such options."""
    names = plugin.Options().keys()
    out: dict[str, Any] = {}
    if "image_size" in names:
        out["image_size"] = 32
    if "vocab_size" in names:
        out["vocab_size"] = 512
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
    config = _config([name], modality_options)
    model = OnePeaceModel(config)
    state: dict[str, Any] = {"model": model, "config": config}

    checks: list[tuple[str, Callable[[], None]]] = [
        ("options", lambda: _check_options(plugin)),
        ("forward_backward", lambda: _check_grad(plugin, state, batch_size, seed)),
        ("masking", lambda: _check_masking(plugin, state, batch_size, seed)),
        ("keep_ids", lambda: _check_keep_ids(plugin, state, batch_size, seed)),
        ("collate", lambda: _check_collate(plugin, state, batch_size, seed)),
        ("padding", lambda: _check_padding(plugin, state, batch_size, seed)),
        ("fused", lambda: _check_fused(plugin, modality_options, batch_size, seed)),
        ("decoder", lambda: _check_decoder(plugin, state, batch_size, seed)),
        ("save_load", lambda: _check_save_load(plugin, state, batch_size, seed)),
    ]
    if compile:
        checks.append(("compile", lambda: _check_compile(plugin, state, batch_size, seed)))
    for check, fn in checks:
        try:
            fn()
            report.results[check] = "ok"
        except _Skip as why:
            report.results[check] = f"skipped: {why}"
        except Exception as exc:  # every failure is reported, not only the first
            report.results[check] = f"FAILED: {type(exc).__name__}: {exc}"
    if raise_on_failure and not report.ok:
        raise ConformanceError(str(report))
    return report


def check_all(**kwargs: Any) -> dict[str, ConformanceReport]:
    """:func:`check_modality` for every registered modality (reports only; nothing raises)."""
    return {m: check_modality(m, raise_on_failure=False, **kwargs) for m in list_modalities()}


# ------------------------------------------------------------------------------------------------- checks
def _check_options(plugin: ModalityPlugin) -> None:
    opts = plugin.parse_options({})
    assert dataclasses.is_dataclass(opts), "options must be a PluginOptions dataclass"
    assert opts.as_dict() == plugin.defaults, f"defaults {plugin.defaults} disagree with the options {opts}"
    try:
        plugin.parse_options({"no_such_option__": 1})
    except PluginOptionError as exc:
        assert plugin.name in str(exc) and "no_such_option__" in str(exc), f"the error must name both: {exc}"
    else:
        raise AssertionError("an unknown option key was accepted")


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
    mask = mask_for(plugin, valid, batch, model.tokenizer, torch.Generator().manual_seed(seed))
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
    mask = mask_for(plugin, valid, batch, model.tokenizer, torch.Generator().manual_seed(seed))
    keep = keep_ids_from_mask(mask, valid)
    with torch.no_grad():
        student = model.forward_features({plugin.name: batch}, keep_ids={plugin.name: keep})
        pred = decoder(student.hidden, {plugin.name: keep}, {plugin.name: ~valid}, {plugin.name: valid.shape[1]})
    assert pred[plugin.name].shape == (batch_size, valid.shape[1], d), f"prediction {tuple(pred[plugin.name].shape)}"
    assert torch.isfinite(pred[plugin.name]).all()


def _check_save_load(plugin: ModalityPlugin, state: dict[str, Any], batch_size: int, seed: int) -> None:
    from one_peace.checkpoint import load, save

    model = state["model"].eval()
    batch = _batch(plugin, state["config"], batch_size, seed)
    before = _embeddings(model, plugin.name, batch)
    with tempfile.TemporaryDirectory(prefix="one-peace-conformance-") as tmp:
        folder = save(model, Path(tmp) / "ckpt")
        again = load(folder).eval()
    assert again.config.modality_options == model.config.modality_options, "options changed in the round trip"
    torch.testing.assert_close(_embeddings(again, plugin.name, batch), before, msg="embeddings changed")


def _check_compile(plugin: ModalityPlugin, state: dict[str, Any], batch_size: int, seed: int) -> None:
    model = state["model"].eval()
    batch = _batch(plugin, state["config"], batch_size, seed)
    eager = _embeddings(model, plugin.name, batch)
    compiled: Any = torch.compile(model)
    with torch.no_grad():
        got = compiled.embed(plugin.name, compiled.forward_features({plugin.name: batch}).hidden[plugin.name])
    torch.testing.assert_close(got, eager, atol=1e-4, rtol=1e-4, msg="compiled output differs from eager")
