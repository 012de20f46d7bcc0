"""#10.18: a plugin adapter with a persistent and a non-persistent buffer saves, loads and resumes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import one_peace
from one_peace import registry
from one_peace.models.adapter import Adapter, AdapterOutput
from one_peace.models.relpos import bucket_1d, bucket_1d_rows
from one_peace.registry import MaskingPolicy, ModalityPlugin
from one_peace.train.batches import BatchList
from one_peace.train.objectives import ContrastiveObjective
from one_peace.train.task import Task
from one_peace.train.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.core


class SensorAdapter(Adapter):
    modality = "sensor"

    def __init__(self, dim: int, heads: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(channels, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.table = nn.Parameter(torch.zeros(bucket_1d_rows(8), heads))
        self.register_buffer("calibration", torch.ones(channels))  # persistent: saved with the weights
        self.register_buffer("window", torch.hann_window(16), persistent=False)  # computed, never saved

    def embed(self, batch):
        x = batch["values"] * self.calibration * self.window.mean()
        tok = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.proj(x)], 1)
        return AdapterOutput(tok, None, bucket_1d(x.shape[1] + 1, 8), self.table)


class SensorModality(ModalityPlugin):
    name = "sensor"
    defaults = {"channels": 3}  # noqa: RUF012
    masking = MaskingPolicy(kind="random", ratio=0.5)

    def build_adapter(self, config, siblings):
        return SensorAdapter(config.embed_dim, config.heads, self.options(config)["channels"])

    def build_preprocessor(self, config, tokenizer=None):
        return lambda row: {"values": torch.as_tensor(row, dtype=torch.float32)}

    def collate(self, samples):
        return {"values": torch.stack([s["values"] for s in samples])}

    def example_batch(self, config, batch_size, generator):
        return {"values": torch.randn(batch_size, 5, 3, generator=generator)}


@pytest.fixture
def sensor():
    registry.register_modality(SensorModality)
    yield
    registry._REGISTRY.plugins.pop("sensor", None)


def _model(seed=0):
    torch.manual_seed(seed)
    return one_peace.build_model("tiny", modalities=("text", "sensor"))


def test_buffers_save_load_and_resume(sensor, tmp_path):
    model = _model()
    with torch.no_grad():
        model.adapters["sensor"].calibration.copy_(torch.tensor([0.5, 2.0, 3.0]))
    batch = one_peace.example_inputs(("sensor",), 2, config=model.config)["sensor"]
    ref = model.eval().encode("sensor", batch)
    folder = one_peace.save(model, tmp_path / "folder")
    loaded = one_peace.load(folder).eval()
    adapter = loaded.adapters["sensor"]
    assert adapter.calibration.tolist() == [0.5, 2.0, 3.0]
    assert adapter.window.device.type == "cpu" and torch.equal(adapter.window, torch.hann_window(16))
    torch.testing.assert_close(loaded.encode("sensor", batch), ref)

    def trainer(m, **cfg):
        task = Task(m, {"c": (ContrastiveObjective(("sensor", "text")), 1.0)})
        b = one_peace.example_inputs(("text", "sensor"), 2, config=m.config)
        b["valid"] = torch.ones(2, dtype=torch.bool)
        return Trainer(task, BatchList([b]), TrainerConfig(max_steps=2, save_every=2, **cfg), tmp_path / "run")

    trainer(model).fit()
    fresh = _model(seed=5)
    assert fresh.adapters["sensor"].calibration.tolist() == [1.0, 1.0, 1.0]
    resumed = trainer(fresh, resume=True)
    assert resumed.resume()
    assert fresh.adapters["sensor"].calibration.tolist() == [0.5, 2.0, 3.0]
