"""``python -m one_peace.export checkpoint=CK modality=image format=onnx out=DIR``: one modality's encoder as a
graph that runs without one-peace (ONNX, for ONNX Runtime) or without Python model code (``torch.export``).

The graph takes the modality's collated batch (the tensors its plugin's collator makes: ``tokens`` and
``padding_mask`` for text, ``pixels`` for images, ``waveform`` and ``padding_mask`` for audio, a plugin's own) and
returns ``embeddings``: the L2-normalised ``(batch, dim)`` vectors ``model.encode`` gives. Every size is dynamic
where the model allows it (the batch; text tokens, audio samples, a plugin's sequence length): the relative-position
bias, the padding mask and the positions are computed inside the graph from the sizes and the mask. Attention is
traced in its plain form (``attn_backend="math"``, matmuls and a softmax, which ONNX Runtime fuses again).

The output folder holds:

* ``model.onnx`` (``format=onnx``; weights of large models in ``model.onnx.data`` beside it) and, with
  ``precision=int8``, ``model.int8.onnx`` (ONNX Runtime's dynamic int8 quantisation of the matmuls), or
  ``model.pt2`` (``format=torch_export``: ``torch.export.load`` gives the program, ``.module()`` runs it);
* ``preprocess.json``: the plugin's preprocessing in plain terms (``describe_preprocessing``: sizes, mean/std,
  sample rate, tokenizer files) and the graph's inputs (names, dtypes, dimension names) and output;
* the tokenizer files (modalities that read text);
* ``example_inputs.npz`` and ``expected.npy``: a collated example batch and the eager model's embeddings of it, and
  ``example.py``, which runs the graph on them with ``onnxruntime`` and ``numpy`` alone and prints the difference.

A modality whose plugin cannot be traced (Python control flow on tensor values, a call into NumPy) fails with
:class:`ExportError` naming the plugin, its distribution and the operation (file, line, code).
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from one_peace.models.encoder import OnePeaceModel

FORMATS = ("onnx", "torch_export")
OUTPUT = "embeddings"


class ExportError(RuntimeError):
    """A modality's encoder cannot be exported (naming the plugin and the operation)."""


class ModalityEncoder(nn.Module):
    """One modality's encoder as a module of positional tensors (the collated batch's tensors, in ``keys``
    order) returning the L2-normalised embedding: what an export traces."""

    def __init__(self, model: OnePeaceModel, modality: str, keys: list[str]) -> None:
        super().__init__()
        self.model = model
        self.modality = modality
        self.keys = list(keys)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        """The embeddings of one collated batch."""
        from one_peace.models.encoding import project

        batch = dict(zip(self.keys, tensors))
        out = self.model.forward_features({self.modality: batch})
        return project(self.model, self.modality, out.hidden[self.modality], True)


@dataclass
class ExportReport:
    """What an export wrote and how closely the exported graph follows the eager model.

    Attributes:
        folder: The output folder.
        files: Files written (names inside the folder).
        inputs: Graph input name -> dimension names (``batch``, ``tokens``..., or a fixed size).
        max_abs_diff: Largest absolute difference of the exported embeddings from the eager ones, per batch size
            checked (L2-normalised outputs).
        int8_cosine: Mean cosine of the int8 graph's embeddings to the eager ones (``precision=int8``).
        seconds: Wall time.
    """

    folder: Path
    files: list[str] = field(default_factory=list)
    inputs: dict[str, list[Any]] = field(default_factory=dict)
    max_abs_diff: dict[int, float] = field(default_factory=dict)
    int8_cosine: float | None = None
    seconds: float = 0.0


def plugin_label(model: OnePeaceModel, modality: str) -> str:
    """``plugin 'motion' (one-peace-motion 0.1.0)`` or ``(built in)``: who owns a modality, for messages."""
    plugin = model.plugins[modality]
    dist, version = plugin.distribution()
    return f"plugin {plugin.name!r} ({f'{dist} {version}' if dist else 'built in'})"


def _operation(exc: BaseException, plugin: Any) -> str:
    """Where a trace failed: the innermost frame in the plugin's own code, else the innermost outside torch."""
    import inspect

    frames = traceback.extract_tb(exc.__traceback__)
    own = Path(inspect.getfile(type(plugin))).resolve().parent
    mine = [f for f in frames if Path(f.filename).resolve().parent == own]
    outside = [f for f in frames if "/torch/" not in f.filename and "/onnxscript/" not in f.filename]
    frame = (mine or outside or frames)[-1] if frames else None
    if frame is None:
        return "unknown operation"
    return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}: `{(frame.line or '').strip()}`"


def _failure(model: OnePeaceModel, modality: str, exc: BaseException, what: str) -> ExportError:
    """One line naming the modality, its plugin, what failed and the first line of the underlying error."""
    first = next((line for line in str(exc).splitlines() if line.strip()), "")
    return ExportError(
        f"cannot export modality {modality!r} ({plugin_label(model, modality)}): {what} "
        f"({type(exc).__name__}{': ' + first if first else ''})"
    )


def example_batch(model: OnePeaceModel, modality: str, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A collated example batch of ``modality`` from its plugin (tensors only)."""
    gen = torch.Generator().manual_seed(seed)
    batch = model.plugins[modality].example_batch(model.config, batch_size, gen)
    return dict(batch)


def _tensors(model: OnePeaceModel, modality: str, batch: dict[str, Any]) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    bad = [k for k, v in batch.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ExportError(
            f"cannot export modality {modality!r} ({plugin_label(model, modality)}): its collated batch holds "
            f"{bad[0]!r} = {type(batch[bad[0]]).__name__}, not a tensor (a graph takes tensors only)"
        )
    keys = sorted(batch)
    return keys, tuple(batch[k] for k in keys)


class _MathAttention:
    """Trace with ``attn_backend="math"``, and eval mode; the model's settings are restored afterwards."""

    def __init__(self, model: OnePeaceModel) -> None:
        self.model = model
        self.backend = model.config.attn_backend
        self.training = model.training

    def __enter__(self) -> None:
        self.model.eval()
        self.model.set_attn_backend("math")

    def __exit__(self, *exc: Any) -> None:
        self.model.set_attn_backend(self.backend)
        self.model.train(self.training)


def trace(model: OnePeaceModel, modality: str, batch_size: int = 2) -> tuple[Any, list[str], tuple[torch.Tensor, ...]]:
    """``(torch.export program, input names, example tensors)`` of ``modality``'s encoder, every dimension dynamic
    where the model allows it (``torch.export.Dim.AUTO``).

    Raises:
        ExportError: naming the plugin and the operation that cannot be traced.
    """
    from torch.export import Dim

    if modality not in model.adapters:
        raise ExportError(f"modality {modality!r} is not in this model (it has {list(model.adapters)})")
    keys, args = _tensors(model, modality, example_batch(model, modality, batch_size))
    encoder = ModalityEncoder(model, modality, keys)
    shapes = ({i: Dim.AUTO for i in range(t.dim())} for t in args)
    with _MathAttention(model), torch.no_grad():
        try:
            program = torch.export.export(encoder, args, dynamic_shapes=(tuple(shapes),))
        except Exception as exc:
            where = _operation(exc, model.plugins[modality])
            raise _failure(model, modality, exc, f"{where} cannot be traced") from exc
    return program, keys, args


def _dims(program: Any, keys: list[str], described: dict[str, Any]) -> dict[str, list[Any]]:
    """Input name -> each dimension: a fixed size, or (dynamic) ``batch`` or the name the plugin's description gives
    it (``tokens``, ``samples``...; else ``<input>_dim<i>``), from the traced program."""
    specs = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    out: dict[str, list[Any]] = {}
    for key, spec in zip(keys, specs):
        value = placeholders[spec.arg.name].meta.get("val")
        shape = list(value.shape) if value is not None else []
        names = described.get(key) if isinstance(described.get(key), list) else None
        dims: list[Any] = []
        for i, size in enumerate(shape):
            if isinstance(size, int) or str(size).isdigit():
                dims.append(int(size))
            elif i == 0:
                dims.append("batch")
            elif names is not None and len(names) == len(shape) and isinstance(names[i], str):
                dims.append(names[i])
            else:
                dims.append(f"{key}_dim{i}")
        out[key] = dims
    return out


def export(
    model: OnePeaceModel,
    modality: str,
    out: str | Path,
    format: str = "onnx",
    precision: str = "fp32",
    check_batch_sizes: tuple[int, ...] = (1, 3),
) -> ExportReport:
    """Export ``modality``'s encoder of ``model`` into the folder ``out`` (replaced; see the module docstring).

    Args:
        model: The model (its weights are read; its attention backend and mode are restored afterwards).
        modality: Any modality of the model, plugins included.
        out: Output folder.
        format: ``onnx`` or ``torch_export``.
        precision: ``fp32``, or ``int8`` (ONNX only: adds ``model.int8.onnx``).
        check_batch_sizes: Batch sizes the exported graph is run at and compared with the eager model.

    Raises:
        ExportError: a modality that cannot be traced (naming the plugin and the operation) or exported.
        ValueError: an unknown format or precision.
    """
    from one_peace.extras import require

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if precision not in ("fp32", "int8"):
        raise ValueError(f"an export's precision must be 'fp32' or 'int8', got {precision!r}")
    if precision == "int8" and format != "onnx":
        raise ValueError("precision='int8' is ONNX Runtime's quantisation: use format=onnx")
    if format == "onnx":
        require("export", "onnx", "onnxruntime", "onnxscript", feature="ONNX export")
    start = time.perf_counter()
    folder = Path(out)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    report = ExportReport(folder)
    program, keys, args = trace(model, modality)
    described = model.plugins[modality].describe_preprocessing(model.config).get("tensor") or {}
    report.inputs = _dims(program, keys, described if isinstance(described, dict) else {})
    encoder = ModalityEncoder(model, modality, keys)
    if format == "onnx":
        _write_onnx(model, encoder, program, args, keys, folder)
        if precision == "int8":
            quantize_int8(folder / "model.onnx", folder / "model.int8.onnx")
    else:
        torch.export.save(program, str(folder / "model.pt2"))
    _write_description(model, modality, report, folder, format)
    checks = {b: example_batch(model, modality, b, seed=b) for b in check_batch_sizes}
    with _MathAttention(model), torch.no_grad():
        for b, batch in checks.items():
            want = encoder(*(batch[k] for k in keys))
            got = run_exported(folder, batch)
            report.max_abs_diff[b] = float((got - want).abs().max())
        if precision == "int8" and checks:
            batch = checks[max(checks)]
            want = encoder(*(batch[k] for k in keys))
            got = run_exported(folder, batch, int8=True)
            report.int8_cosine = float(torch.nn.functional.cosine_similarity(got, want).mean())
    report.files = sorted(p.name for p in folder.iterdir())
    report.seconds = time.perf_counter() - start
    return report


def _write_onnx(
    model: OnePeaceModel, encoder: ModalityEncoder, program: Any, args: Any, keys: list[str], folder: Path
) -> None:
    import warnings

    with _MathAttention(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and fallback chatter
        try:
            onnx_program = torch.onnx.export(
                program, args, dynamo=True, input_names=keys, output_names=[OUTPUT], verbose=False
            )
        except Exception as exc:
            raise _failure(model, encoder.modality, exc, "the ONNX exporter failed") from exc
        assert onnx_program is not None
        large = sum(p.numel() * p.element_size() for p in model.parameters()) > (1 << 30)
        onnx_program.save(str(folder / "model.onnx"), external_data=large)


def quantize_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime's dynamic int8 quantisation of ``src`` (weights int8, activations quantised per batch)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the graph first, on the root logger, every call
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def _write_description(model: OnePeaceModel, modality: str, report: ExportReport, folder: Path, fmt: str) -> None:
    plugin = model.plugins[modality]
    batch = example_batch(model, modality, 2)
    description: dict[str, Any] = {
        "format": fmt,
        "modality": modality,
        "plugin": plugin.record(model.config),
        "preprocessing": plugin.describe_preprocessing(model.config),
        "inputs": {
            k: {"dims": d, "dtype": str(batch[k].dtype).removeprefix("torch.")} for k, d in report.inputs.items()
        },
        "output": {"name": OUTPUT, "dims": ["batch", model.config.embed_dim], "l2_normalised": True},
    }
    if plugin.needs_tokenizer and model.tokenizer is not None:
        description["tokenizer"] = dict(model.tokenizer.save(folder))
    (folder / "preprocess.json").write_text(json.dumps(description, indent=2) + "\n")
    arrays: dict[str, Any] = {k: v.numpy() for k, v in batch.items()}
    np.savez(folder / "example_inputs.npz", **arrays)
    keys = sorted(batch)
    with _MathAttention(model), torch.no_grad():
        expected = ModalityEncoder(model, modality, keys)(*(batch[k] for k in keys))
    np.save(folder / "expected.npy", expected.numpy())
    (folder / "example.py").write_text(EXAMPLE if fmt == "onnx" else EXAMPLE_PT2)


EXAMPLE = '''"""Run the exported encoder with ONNX Runtime alone: python example.py [model.onnx | model.int8.onnx]"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

here = Path(__file__).parent
spec = json.loads((here / "preprocess.json").read_text())
session = ort.InferenceSession(str(here / (sys.argv[1] if len(sys.argv) > 1 else "model.onnx")))
inputs = dict(np.load(here / "example_inputs.npz"))  # a collated batch: see preprocess.json for how to make one
(embedding,) = session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})
expected = np.load(here / "expected.npy")
print(f"{spec['modality']}: embeddings {embedding.shape}, norms {np.linalg.norm(embedding, axis=1).round(4)}")
print(f"max abs difference from the eager model: {np.abs(embedding - expected).max():.2e}")
'''

EXAMPLE_PT2 = '''"""Run the exported program with torch alone (no one-peace): python example.py"""

from pathlib import Path

import numpy as np
import torch

here = Path(__file__).parent
program = torch.export.load(str(here / "model.pt2"))
inputs = dict(np.load(here / "example_inputs.npz"))
embedding = program.module()(*(torch.from_numpy(inputs[k]) for k in sorted(inputs)))
expected = np.load(here / "expected.npy")
print(f"embeddings {tuple(embedding.shape)}; max abs difference from the eager model: "
      f"{np.abs(embedding.numpy() - expected).max():.2e}")
'''


def run_exported(folder: str | Path, batch: dict[str, Any], int8: bool = False) -> torch.Tensor:
    """The embeddings of a collated ``batch`` from an exported folder (ONNX Runtime, or the ``torch.export``
    program)."""
    folder = Path(folder)
    if (folder / "model.pt2").exists():
        program = torch.export.load(str(folder / "model.pt2"))
        with torch.no_grad():
            return program.module()(*(batch[k] for k in sorted(batch)))  # type: ignore[no-any-return]
    session = _session(folder / ("model.int8.onnx" if int8 else "model.onnx"))
    feeds = {i.name: _numpy(batch[i.name]) for i in session.get_inputs()}
    (out,) = session.run(None, feeds)
    return torch.from_numpy(out)


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class ExportConfig:
    """Export one modality's encoder of a checkpoint (ONNX or torch.export), with its preprocessing description.

    Attributes:
        checkpoint: A checkpoint folder of ours, an official ``.pt`` file or a pretrained name.
        modality: The modality to export (any of the checkpoint's, plugins included).
        out: Output folder (replaced).
        format: ``onnx`` (ONNX Runtime) or ``torch_export`` (a ``.pt2`` program).
        precision: ``fp32``, or ``int8`` (ONNX Runtime's dynamic quantisation, beside the fp32 graph).
        bpe_dir: Official BPE files for an official ``.pt`` checkpoint's text.
    """

    checkpoint: str = "???"
    modality: str = "???"
    out: str = "???"
    format: str = "onnx"
    precision: str = "fp32"
    bpe_dir: str | None = None


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    import one_peace
    from one_peace.cli import parse
    from one_peace.extras import MissingExtraError

    cfg = parse(ExportConfig, argv, "python -m one_peace.export")
    try:
        model = one_peace.load(cfg.checkpoint, bpe_dir=cfg.bpe_dir)
        report = export(model, cfg.modality, cfg.out, cfg.format, cfg.precision)
    except (ExportError, ValueError, FileNotFoundError, RuntimeError, MissingExtraError) as exc:
        raise SystemExit(f"error: {exc}") from None
    diffs = ", ".join(f"batch {b}: {d:.1e}" for b, d in report.max_abs_diff.items())
    print(f"wrote {report.folder} in {report.seconds:.1f} s: {', '.join(report.files)}")
    print(f"inputs: {report.inputs}; max abs difference from eager: {diffs}")
    if report.int8_cosine is not None:
        print(f"int8: mean cosine to eager {report.int8_cosine:.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
