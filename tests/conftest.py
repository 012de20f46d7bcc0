"""Shared fixtures: the parity folder, tiny models, and the official-format tiny checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parents[1]


def parity_dir() -> Path | None:
    """``$ONE_PEACE_PARITY_DIR`` or ``../shared/parity`` beside the repository."""
    env = os.environ.get("ONE_PEACE_PARITY_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(ROOT.parent / "shared" / "parity")
    for c in candidates:
        if (c / "one_peace_tiny_state.safetensors").is_file():
            return c
    return None


@pytest.fixture(scope="session")
def parity() -> Path:
    """The parity folder; skipped when absent outside CI, a failure when ``CI`` is set."""
    path = parity_dir()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but ../shared/parity (or $ONE_PEACE_PARITY_DIR) is missing")
        pytest.skip("parity data not found: set ONE_PEACE_PARITY_DIR or place shared/parity beside the repository")
    return path


@pytest.fixture(scope="session")
def official_tiny(parity: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny parity weights wrapped into an official-style fairseq file ``{"cfg": ..., "model": ...}``."""
    from safetensors.torch import load_file

    state = load_file(str(parity / "one_peace_tiny_state.safetensors"))
    cfg = json.loads((parity / "one_peace_tiny_config.json").read_text())
    path = tmp_path_factory.mktemp("official") / "one_peace_tiny.pt"
    torch.save(
        {
            "cfg": {"model": {"_name": "one_peace_retrieval", "encoder": cfg["encoder"]}, "task": cfg["task"]},
            "model": state,
        },
        path,
    )
    return path


@pytest.fixture(scope="session")
def parity_io(parity: Path) -> dict[str, torch.Tensor]:
    """Inputs and official outputs of parity README §4."""
    from safetensors.torch import load_file

    return load_file(str(parity / "one_peace_tiny_io.safetensors"))


@pytest.fixture
def tiny_model():
    """A fresh tiny model with text, image, audio and video (nondefault init so layers mix)."""
    import one_peace

    torch.manual_seed(0)
    model = one_peace.build_model("tiny", modalities=("text", "image", "audio", "video"), layer_scale_init=0.5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos_table" in name or "cls_" in name or "temporal" in name:
                p.normal_(0, 0.5)
    return model.eval()
