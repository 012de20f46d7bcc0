"""#25: sharing models: ``save_pretrained`` from a training run (sharded safetensors, the model card with the recipe
and the recorded evaluation), ``push_to_hub`` against a stub of the Hub's upload endpoints on 127.0.0.1, and
``SentenceTransformer(folder, trust_remote_code=True)`` giving ``model.encode``'s vectors. No test touches the
network."""

from __future__ import annotations

import base64
import http.server
import json
import socketserver
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from hydra import compose, initialize_config_module
from PIL import Image

import one_peace
from one_peace.checkpoint.folder import INDEX
from one_peace.hub import push_to_hub, save_pretrained

TEXTS = ["a red circle", "a blue square on a green field", "two yellow triangles"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A 4-step vl_contrastive run (its output folder and its evaluation results)."""
    from one_peace.run import run

    out = tmp_path_factory.mktemp("run")
    small = ["data.demo_train=32", "data.demo_valid=16", "data.image_size=32", "trainer.batch_size=8"]
    steps = ["trainer.max_steps=4", "trainer.save_every=4", "trainer.log_every=2", "data.vocab_size=300"]
    with initialize_config_module(config_module="one_peace.recipes", version_base=None):
        cfg = compose(config_name="config", overrides=["recipe=vl_contrastive", f"output_dir={out}", *small, *steps])
    return out, run(cfg)


def _images(n: int, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_save_pretrained_from_a_run_shards_the_weights_cards_the_run_and_loads_identically(trained_run, tmp_path):
    out, results = trained_run
    from one_peace.hub import main

    assert main(["save", str(out), str(tmp_path / "shared"), "--shard-size", "256kB", "--license", "apache-2.0"]) == 0
    shared = tmp_path / "shared"
    names = sorted(p.name for p in shared.iterdir())
    shards = [n for n in names if n.startswith("model-") and n.endswith(".safetensors")]
    assert len(shards) > 1 and INDEX in names and "model.safetensors" not in names
    assert {"config.json", "tokenizer.json", "modules.json", "config_sentence_transformers.json", "README.md"} <= set(
        names
    )
    assert "training_state" not in names and "COMPLETE" not in names
    index = json.loads((shared / INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    trained = one_peace.load(results["checkpoint"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in trained.state_dict().values())

    again = one_peace.load(shared)
    assert torch.equal(again.encode("text", TEXTS), trained.encode("text", TEXTS))
    assert torch.equal(again.encode("image", _images(2)), trained.encode("image", _images(2)))

    card = (shared / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "one-peace" and meta["license"] == "apache-2.0"
    assert {"image", "text"} <= set(meta["tags"])
    assert "Recipe: `vl_contrastive`" in card and "  max_steps: 4\n" in card  # the composed config
    recorded = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    numbers = {k: v for k, v in results.items() if isinstance(v, float)}
    assert numbers and all(recorded[k] == pytest.approx(v) for k, v in numbers.items())
    assert "image->text/R@1" in recorded and f"| image->text/R@1 | {results['image->text/R@1']:.4g} |" in card
    assert "- trained with one-peace: 0.1.0" in card and "- trained with torch:" in card


def test_save_pretrained_refuses_what_is_not_a_checkpoint_or_run(tmp_path, capsys):
    from one_peace.checkpoint import CheckpointError
    from one_peace.hub import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint folder"):
        save_pretrained(tmp_path / "empty", tmp_path / "out")
    assert main(["save", str(tmp_path / "empty"), str(tmp_path / "out")]) == 1
    assert "neither a checkpoint folder" in capsys.readouterr().err
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="without a complete checkpoint"):
        save_pretrained(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _Hub(http.server.BaseHTTPRequestHandler):
    """The Hub's endpoints an upload uses (repo creation, card validation, pre-upload, the LFS batch API, LFS
    uploads, the commit), recording what it receives. The card's metadata is validated with huggingface_hub's own
    model-index parser (a 400 with the error, as the Hub answers invalid metadata)."""

    files: ClassVar[dict[str, bytes]] = {}
    lfs: ClassVar[dict[str, bytes]] = {}
    calls: ClassVar[list[str]] = []
    repos: ClassVar[list[dict[str, Any]]] = []

    def _reply(self, code: int, doc: Any) -> None:
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        _Hub.calls.append(f"GET {self.path}")
        self._reply(404, {"error": "not in this stub"})

    def do_PUT(self) -> None:
        _Hub.calls.append(f"PUT {self.path}")
        _Hub.lfs[self.path.rsplit("/", 1)[-1]] = self._body()
        self._reply(200, {})

    def do_POST(self) -> None:
        from huggingface_hub.repocard_data import model_index_to_eval_results

        body, host = self._body(), self.headers["Host"]
        _Hub.calls.append(f"POST {self.path}")
        if self.path == "/api/repos/create":
            _Hub.repos.append(json.loads(body))
            return self._reply(200, {"url": f"http://{host}/org/name", "name": "org/name"})
        if self.path == "/api/validate-yaml":
            meta = yaml.safe_load(json.loads(body)["content"].split("---\n")[1])
            try:
                model_index_to_eval_results(meta["model-index"])
            except Exception as exc:
                return self._reply(400, {"errors": [{"message": str(exc)}]})
            return self._reply(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            paths = [f["path"] for f in json.loads(body)["files"]]
            modes = [{"path": p, "uploadMode": "lfs" if p.endswith(".safetensors") else "regular"} for p in paths]
            return self._reply(200, {"files": [{**m, "shouldIgnore": False} for m in modes]})
        if self.path.endswith(".git/info/lfs/objects/batch"):
            objects = [
                {**o, "actions": {"upload": {"href": f"http://{host}/lfs/{o['oid']}"}}}
                for o in json.loads(body)["objects"]
            ]
            return self._reply(200, {"transfer": "basic", "objects": objects})
        if "/commit/" in self.path:
            for line in body.decode().splitlines():
                op = json.loads(line)
                if op["key"] == "file":
                    _Hub.files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
                elif op["key"] == "lfsFile":
                    _Hub.files[op["value"]["path"]] = _Hub.lfs[op["value"]["oid"]]
            return self._reply(200, {"commitUrl": f"http://{host}/org/name/commit/1", "commitOid": "1" * 40})
        self._reply(404, {"error": f"{self.path} is not in this stub"})

    def log_message(self, *args: object) -> None:
        pass


def test_push_to_hub_uploads_the_shared_folder_to_a_hub_stub(trained_run, tmp_path, monkeypatch):
    import huggingface_hub.constants

    out, results = trained_run
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Hub.files, _Hub.lfs, _Hub.calls, _Hub.repos = {}, {}, [], []
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # the stub speaks LFS, not Xet
    try:
        url = push_to_hub(out, "org/name", token="hf_test", shard_size="256kB", private=True)
    finally:
        server.shutdown()
        server.server_close()
    assert url.endswith("/org/name/commit/1")
    assert [(r["organization"], r["name"], r["visibility"], r["type"]) for r in _Hub.repos] == [
        ("org", "name", "private", "model")
    ]
    local = save_pretrained(out, tmp_path / "local", shard_size="256kB")
    expected = {p.name for p in local.iterdir()}
    assert set(_Hub.files) == expected
    for name in expected - {"README.md"}:  # the card names the repository instead of the folder
        assert _Hub.files[name] == (local / name).read_bytes(), name
    assert 'one_peace.load("hf-hub:org/name")' in _Hub.files["README.md"].decode()
    shards = [n for n in expected if n.endswith(".safetensors")]
    assert len([c for c in _Hub.calls if c.startswith("PUT /lfs/")]) == len(shards) > 1  # weights through LFS

    received = tmp_path / "received"
    received.mkdir()
    for name, data in _Hub.files.items():
        (received / name).write_bytes(data)
    trained = one_peace.load(results["checkpoint"])
    assert torch.equal(one_peace.load(received).encode("text", TEXTS), trained.encode("text", TEXTS))


@pytest.fixture(scope="module")
def st_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny text/image/audio/motion (a plugin's modality) model saved as any checkpoint folder is."""
    from one_peace.adapters.text import TextTokenizer

    torch.manual_seed(0)
    model = one_peace.build_model("tiny", modalities=("text", "image", "audio", "motion"), layer_scale_init=0.5)
    model.tokenizer = TextTokenizer.train(TEXTS * 4, vocab_size=280)
    return one_peace.save(model, tmp_path_factory.mktemp("st") / "model")


def test_sentence_transformers_encode_equals_model_encode_for_every_modality(st_folder, tmp_path):
    from sentence_transformers import SentenceTransformer

    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(st_folder))
    st = SentenceTransformer(str(st_folder), trust_remote_code=True, device="cpu")
    model = one_peace.load(st_folder)
    assert st.get_embedding_dimension() == model.config.embed_dim
    rng = np.random.default_rng(1)
    images = _images(3, 40)
    Image.fromarray(images[0]).save(tmp_path / "photo.png")
    waves = [rng.standard_normal(n).astype(np.float32) for n in (16000, 24000)]
    sf.write(tmp_path / "sound.wav", waves[0], 16000)
    motions = [rng.standard_normal((n, 6)).astype(np.float32) for n in (50, 80)]
    cases = {
        "text": (TEXTS, TEXTS),
        "image": ([Image.fromarray(i) for i in images] + [str(tmp_path / "photo.png")], [*images, images[0]]),
        "audio": (
            [{"array": w, "sampling_rate": 16000} for w in waves] + [str(tmp_path / "sound.wav")],
            [(w, 16000) for w in waves] + [str(tmp_path / "sound.wav")],  # (16-bit PCM on disk)
        ),
        "motion": ([{"motion": m} for m in motions], motions),
    }
    for modality, (st_inputs, ours) in cases.items():
        got = st.encode(st_inputs, convert_to_tensor=True, batch_size=2)
        want = model.encode(modality, ours)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=modality)
        assert torch.allclose(got.norm(dim=-1), torch.ones(len(ours)))
    assert torch.allclose(st.encode(TEXTS[0], convert_to_tensor=True), model.encode("text", TEXTS[:1])[0], atol=1e-6)
    prompted = st.encode(["circle"], prompt="a red ", convert_to_tensor=True)
    torch.testing.assert_close(prompted, model.encode("text", ["a red circle"]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="'video' is not supported"):  # sentence-transformers' own check
        st.encode([np.zeros((2, 3, 8, 8), dtype=np.float32)])
    with pytest.raises(ValueError, match=r"one-peace: cannot tell the modality of a dict input .*'motion'"):
        st.encode([{"smell": [1.0, 2.0]}])

    st.save(str(tmp_path / "resaved"))  # sentence-transformers' own save: our module writes the checkpoint files
    resaved = SentenceTransformer(str(tmp_path / "resaved"), trust_remote_code=True, device="cpu")
    torch.testing.assert_close(resaved.encode(TEXTS, convert_to_tensor=True), model.encode("text", TEXTS))
    assert torch.equal(one_peace.load(tmp_path / "resaved").encode("text", TEXTS), model.encode("text", TEXTS))


def test_save_pretrained_of_a_model_in_memory(st_folder, tmp_path):
    model = one_peace.load(st_folder)
    model.trained_with = {"recipe": "vl_contrastive", "uses": ["retrieval"]}
    shared = save_pretrained(model, tmp_path / "shared", shard_size="128kB")
    again = one_peace.load(shared)
    assert again.trained_with == model.trained_with
    assert torch.equal(again.encode("text", TEXTS), model.encode("text", TEXTS))
    assert _front_matter((shared / "README.md").read_text())["library_name"] == "one-peace"
