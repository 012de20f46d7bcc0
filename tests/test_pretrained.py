"""#25 (part): official checkpoints by name, served from a local HTTP server on 127.0.0.1 (no test touches the
network): the download with a progress bar, a resume after a cut, a corrupted file refused, the cache offline."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import socketserver
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import one_peace


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves a folder with ``Range`` support; ``cut`` names a file whose next answer breaks off half-way."""

    root: ClassVar[Path]
    cut: ClassVar[set[str]] = set()
    requests: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        _Files.requests.append((name, self.headers.get("Range")))
        path = _Files.root / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if name in _Files.cut:
            _Files.cut.discard(name)
            self.wfile.write(body[: len(body) // 2])  # then the connection closes
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mirror(tmp_path, official_tiny, parity, monkeypatch):
    """The tiny official-format checkpoint as ``one-peace.pt`` and the official BPE files, on 127.0.0.1."""
    served = tmp_path / "served"
    served.mkdir()
    shutil.copyfile(official_tiny, served / "one-peace.pt")
    for f in ("encoder.json", "vocab.bpe", "dict.txt"):
        shutil.copyfile(parity / "bpe" / f, served / f)
    _Files.root, _Files.requests = served, []
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("ONE_PEACE_MIRROR", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv("ONE_PEACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("ONE_PEACE_OFFLINE", raising=False)
    yield served
    server.shutdown()
    server.server_close()


def test_a_name_downloads_resumes_verifies_converts_and_then_loads_offline(mirror, tmp_path, official_tiny, capsys):
    from one_peace.pretrained import PretrainedError

    _Files.cut = {"one-peace.pt"}
    with pytest.raises(PretrainedError, match=r"connection (closed|broke) after [\d,]+ .*run it again to resume"):
        one_peace.load("one-peace-4b")
    partial = tmp_path / "cache" / "pretrained" / "one-peace-4b" / "one-peace.pt.partial"
    half = partial.stat().st_size
    assert 0 < half < (mirror / "one-peace.pt").stat().st_size
    model = one_peace.load("one-peace-4b")  # resumes from the partial file
    ranges = [r for name, r in _Files.requests if name == "one-peace.pt"]
    assert ranges == [None, f"bytes={half}-"], ranges
    assert "one-peace-4b" in capsys.readouterr().err  # the progress bar, named
    want = one_peace.load(official_tiny, bpe_dir=mirror)
    ids = want.tokenizer.encode("a dog on the grass")
    batch = {"tokens": torch.tensor([ids]), "padding_mask": torch.zeros(1, len(ids), dtype=torch.bool)}
    torch.testing.assert_close(model.encode("text", batch), want.encode("text", batch))
    source = (tmp_path / "cache" / "pretrained" / "one-peace-4b" / "source.json").read_text()
    assert hashlib.sha256((mirror / "one-peace.pt").read_bytes()).hexdigest() in source
    assert not (tmp_path / "cache" / "pretrained" / "one-peace-4b" / "one-peace.pt").exists()  # converted, deleted

    count = len(_Files.requests)
    import os

    os.environ["ONE_PEACE_OFFLINE"] = "1"
    try:
        again = one_peace.load("one-peace-4b")  # the cache, no request
        assert len(_Files.requests) == count
        torch.testing.assert_close(again.encode("text", batch), want.encode("text", batch))
        with pytest.raises(PretrainedError, match=r"one-peace-4b-coco is not in the cache .*fetch http://127\.0\.0\.1"):
            one_peace.load("one-peace-4b-coco")
    finally:
        del os.environ["ONE_PEACE_OFFLINE"]


def test_a_corrupted_or_unpinned_file_is_refused_naming_both_hashes(mirror, tmp_path):
    from one_peace.pretrained import PretrainedError

    good = hashlib.sha256((mirror / "one-peace.pt").read_bytes()).hexdigest()
    with pytest.raises(PretrainedError, match=rf"SHA-256 {good}, expected {'0' * 64} \(pinned\)"):
        one_peace.load("one-peace-4b", sha256="0" * 64)
    one_peace.load("one-peace-4b", progress=False)  # records the hash seen
    shutil.rmtree(tmp_path / "cache" / "pretrained" / "one-peace-4b" / "model")  # as if the cache were cleared
    raw = bytearray((mirror / "one-peace.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (mirror / "one-peace.pt").write_bytes(bytes(raw))
    bad = hashlib.sha256(bytes(raw)).hexdigest()
    with pytest.raises(PretrainedError, match=rf"SHA-256 {bad}, expected {good} \(recorded at the first download"):
        one_peace.load("one-peace-4b", progress=False)
    with pytest.raises(PretrainedError, match=r"unknown pretrained name 'one-peace-9b'; known: one-peace-4b"):
        one_peace.load("one-peace-9b")


def test_the_names_are_listed(capsys, tmp_path, monkeypatch):
    from one_peace.pretrained import main

    monkeypatch.setenv("ONE_PEACE_CACHE", str(tmp_path))
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "one-peace-4b " in out and "not cached" in out and "audio-text retrieval" in out


def test_an_hf_hub_name_loads_offline_from_a_hub_layout_cache(tmp_path, monkeypatch):
    """``hf-hub:org/name`` through huggingface_hub's cache (snapshots linking into blobs/), without the network."""
    pytest.importorskip("huggingface_hub")
    from one_peace.adapters.text import TextTokenizer

    from one_peace.pretrained import PretrainedError

    tok = TextTokenizer.train(["a red square", "a blue circle"] * 4, vocab_size=280)
    cfg = one_peace.model_config("tiny", ("text",), modality_options={"text": {"vocab_size": tok.vocab_size}})
    model = one_peace.build_model(cfg).eval()
    model.tokenizer = tok
    saved = one_peace.save(model, tmp_path / "model")
    repo = tmp_path / "hub" / "models--someone--tiny-one-peace"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in saved.iterdir():
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("ONE_PEACE_OFFLINE", "1")
    loaded = one_peace.load("hf-hub:someone/tiny-one-peace")
    texts = ["a red square", "a blue circle"]
    torch.testing.assert_close(loaded.encode("text", texts), model.encode("text", texts))
    assert one_peace.load(f"hf-hub:someone/tiny-one-peace@{commit}").config == loaded.config
    with pytest.raises(PretrainedError, match=r"hf-hub:someone/other: not found in the cache \(downloads are off\)"):
        one_peace.load("hf-hub:someone/other")
    with pytest.raises(PretrainedError, match=r"expected hf-hub:<org>/<name>"):
        one_peace.load("hf-hub:no-org")
