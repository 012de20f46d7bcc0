"""#24 The search service under hostile clients: uploads are bytes (never paths or URLs), bounded work, timeouts,
access control, and the OpenAI-compatible embeddings API."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import socket
import socketserver
import threading
import time
from typing import ClassVar

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("httpx", reason="the dev extra is not installed")

import one_peace


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A tiny untrained text + image + audio model, an index of 6 images and one of 4 clips."""
    import soundfile as sf
    from one_peace.adapters.text import TextTokenizer
    from PIL import Image

    from one_peace.embed import EmbedConfig, embed

    root = tmp_path_factory.mktemp("limits")
    tok = TextTokenizer.train(["a red square", "a blue circle"] * 4, vocab_size=280)
    cfg = one_peace.model_config("tiny", ("text", "image", "audio"), layer_scale_init=1.0)
    cfg.modality_options = {
        "text": {"vocab_size": tok.vocab_size},
        "image": {"image_size": 32},
        "audio": {"frontend": "fbank", "feature_dim": 64},
    }
    model = one_peace.build_model(cfg).eval()
    model.tokenizer = tok
    checkpoint = one_peace.save(model, root / "model")
    rows = []
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"id": f"img{i}", "image": f"{i}.png"})
    (root / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    clips = []
    for i in range(4):
        t = np.arange(16000) / 16000
        sf.write(root / f"c{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 90 * i) * t)).astype(np.float32), 16000)
        clips.append({"id": f"clip{i}", "audio": f"c{i}.wav"})
    (root / "clips.jsonl").write_text("".join(json.dumps(r) + "\n" for r in clips))
    for name, data, modality in (("images", "images.jsonl", "image"), ("sounds", "clips.jsonl", "audio")):
        embed(
            EmbedConfig(
                checkpoint=str(checkpoint),
                data=str(root / data),
                modality=modality,
                out=str(root / name),
                progress=False,
                workers=0,
            )
        )
    return {"root": root, "checkpoint": checkpoint, "model": one_peace.load(checkpoint)}


def _service(corpus: dict, **limits):
    from one_peace.serve.limits import Limits
    from one_peace.serve.service import SearchService

    return SearchService([str(corpus["root"] / "images"), str(corpus["root"] / "sounds")], limits=Limits(**limits))


@pytest.fixture(scope="module")
def client(corpus):
    from fastapi.testclient import TestClient

    from one_peace.serve.app import create_app

    service = _service(corpus, max_upload_mb=1.0, max_image_pixels=1_000_000, max_media_seconds=60)
    with TestClient(create_app(service)) as c:
        c.service = service  # type: ignore[attr-defined]
        yield c
    service.close()


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Recorder.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ID3")

    def log_message(self, *args: object) -> None:
        pass


# ------------------------------------------------------------------------------------- bytes, never paths
def test_a_media_field_sent_as_text_is_refused_before_anything_is_opened_or_fetched(client, corpus, monkeypatch):
    """`image=/etc/shadow` was opened (a file-existence oracle that also matched private images at score 1.0),
    `audio=http://...` was fetched through FFmpeg, `image=/dev/stdin` froze every query."""
    import one_peace.models.encoding as encoding

    opened = []
    real = encoding.preprocessor
    monkeypatch.setattr(encoding, "preprocessor", lambda m, name: opened.append(name) or real(m, name))
    srv = socketserver.TCPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    private = corpus["root"] / "0.png"
    try:
        cases = [
            ("images", "image", str(private)),
            ("images", "image", "/etc/shadow"),
            ("images", "image", "/nonexistent/file"),
            ("images", "image", "/root"),
            ("images", "image", "/dev/stdin"),
            ("sounds", "audio", f"http://127.0.0.1:{srv.server_address[1]}/x.mp3"),
            ("sounds", "audio", f"tcp://127.0.0.1:{srv.server_address[1]}"),
        ]
        for index, field, value in cases:
            res = client.post("/search", data={"index": index, field: value})
            assert res.status_code == 422, (value, res.status_code, res.text)
            assert "must be an uploaded file" in res.json()["error"]
            assert "/etc" not in res.text and str(corpus["root"]) not in res.text and "root" not in res.json()["error"]
    finally:
        srv.shutdown()
    assert _Recorder.hits == [] and opened == []  # nothing fetched, nothing preprocessed


def test_undecodable_uploads_never_reveal_server_paths(client):
    res = client.post("/search", data={"index": "images"}, files={"image": ("x.png", b"\x89PNG broken", "image/png")})
    assert res.status_code == 422 and "/" not in res.json()["error"].split("cannot be used:")[1].replace("<path>", "")


# ------------------------------------------------------------------------------------ caps before decoding
def _png_claiming(width: int, height: int) -> bytes:
    from test_hardening import png_claiming

    return png_claiming(width, height)


def _flac(seconds: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(seconds * 8000, dtype=np.int16), 8000, format="FLAC")
    return buf.getvalue()


def test_oversized_images_and_long_audio_get_a_4xx_before_decoding(client, monkeypatch):
    """A 140 kB PNG of 144 Mpx cost +673 MB a request, a 256-Mpx PNG a 500, a silent 30-min FLAC +770 MB."""
    import one_peace.models.encoding as encoding

    decoded = []
    real = encoding.preprocessor
    monkeypatch.setattr(encoding, "preprocessor", lambda m, name: decoded.append(name) or real(m, name))
    flac = _flac(30 * 60)
    assert len(flac) < 1024 * 1024  # under the byte limit: only the duration cap can refuse it
    cases = [
        ("images", "image", _png_claiming(16_000, 16_000), r"256,000,000 pixels.*max_image_pixels"),
        ("images", "image", _png_claiming(12_000, 12_000), r"12000 x 12000 = 144,000,000 pixels.*1,000,000"),
        ("sounds", "audio", flac, r"1800 s long; this server decodes at most 60 s \(max_media_seconds\)"),
    ]
    import re

    for index, field, data, message in cases:
        res = client.post("/search", data={"index": index}, files={field: ("upload", data)})
        assert res.status_code == 413, (message, res.status_code, res.text)
        assert re.search(message, res.json()["error"]), res.json()
    assert decoded == []
    ok = client.post("/search", data={"index": "sounds"}, files={"audio": ("a.flac", _flac(5))})
    assert ok.status_code == 200 and decoded == ["audio"], ok.text


def test_a_chunked_upload_is_cut_off_at_the_limit(client):
    """Without a Content-Length the whole body was spooled (2 GiB of temp space) before the 413."""
    import httpx

    sent = []

    async def body():
        yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(200):  # 200 x 64 KiB = 12.5 MiB offered; the limit is 1 MiB
            sent.append(1)
            yield b"x" * 65536

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.post("/search", content=body(), headers={"content-type": "multipart/form-data; boundary=x"})

    res = asyncio.run(main())
    assert res.status_code == 413 and "max_upload_mb" in res.json()["error"]
    assert len(sent) <= 1024 * 1024 // 65536 + 3, len(sent)  # read up to the limit, not beyond


# ------------------------------------------------------------------------------------------ bounded work
class _Held:
    """Holds the query worker inside a forward until released."""

    def __init__(self, service) -> None:
        self.service, self.entered, self.go = service, threading.Event(), threading.Event()
        self.real = service._run

    def __enter__(self) -> _Held:
        def held(jobs):
            self.entered.set()
            self.go.wait(30)
            return self.real(jobs)

        self.service._run = held
        return self

    def __exit__(self, *exc: object) -> None:
        self.go.set()
        self.service._run = self.real


def test_health_answers_while_a_query_is_held_and_a_full_queue_answers_429(corpus):
    import httpx

    from one_peace.serve.app import create_app

    service = _service(corpus, max_queue=2)
    app = create_app(service)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            with _Held(service) as held:
                first = asyncio.create_task(c.post("/search", data={"index": "images", "text": "a red square"}))
                await asyncio.to_thread(held.entered.wait, 10)
                t0 = time.perf_counter()
                health = await c.get("/health")
                assert health.status_code == 200 and time.perf_counter() - t0 < 2.0
                waiting = [
                    asyncio.create_task(c.post("/search", data={"index": "images", "text": f"q{i}"})) for i in range(4)
                ]
                await asyncio.sleep(1.0)  # a refused request answers at once; the others wait for the worker
                refused = [t.result() for t in waiting if t.done() and t.result().status_code == 429]
                assert refused, [t.done() for t in waiting]
                assert refused[0].headers["retry-after"] == "1" and "max_queue 2" in refused[0].json()["error"]
            assert all(r.status_code in (200, 429) for r in await asyncio.gather(*waiting))
            assert (await first).status_code == 200

    try:
        asyncio.run(main())
        assert service.counts["refused_full"] >= 1
    finally:
        service.close()


def test_abandoned_and_expired_queries_are_dropped_before_they_are_embedded(corpus):
    """28 requests whose clients had gone were still embedded; a new query waited 6 s behind them."""
    service = _service(corpus, request_timeout_s=0.2)

    async def gone() -> bool:
        return True

    async def main() -> None:
        with _Held(service) as held:
            blocker = asyncio.create_task(service.search("images", {"text": "first"}))
            await asyncio.to_thread(held.entered.wait, 10)
            abandoned = [
                asyncio.create_task(service.search("images", {"text": f"a{i}"}, disconnected=gone)) for i in range(5)
            ]
            await asyncio.sleep(0.3)  # their clients are gone; meanwhile the queue is past its deadline too
            expired = asyncio.create_task(service.search("images", {"text": "late"}))
            await asyncio.sleep(0.3)
        await blocker
        for task in abandoned:
            with pytest.raises(Exception, match="went away"):
                await task
        with pytest.raises(Exception, match="request_timeout_s"):
            await expired

    try:
        before = service.counts["embedded"]
        asyncio.run(main())
        assert service.counts["abandoned"] == 5 and service.counts["expired"] == 1, service.counts
        assert service.counts["embedded"] - before == 1  # only the first query reached the model
    finally:
        service.close()


# ----------------------------------------------------------------------------------- a real socket server
@pytest.fixture
def live(corpus):
    """The app under uvicorn on 127.0.0.1 with a 1 s header timeout."""
    import uvicorn

    from one_peace.serve.app import create_app
    from one_peace.serve.limits import header_timeout_protocol

    service = _service(corpus, header_timeout_s=1.0)
    app = create_app(service, api_key="s3cret")
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", http=header_timeout_protocol(1.0))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", port
    server.should_exit = True
    thread.join(10)
    service.close()


def test_a_connection_that_never_finishes_its_headers_is_closed(live):
    _, port = live
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: the headers never end
    sock.settimeout(5)
    t0 = time.perf_counter()
    assert sock.recv(1024) == b""  # closed by the server
    assert time.perf_counter() - t0 < 3.0
    sock.close()


def test_with_a_key_every_data_route_needs_it(live):
    import httpx

    url, _ = live
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/").status_code == 200
    for method, path in (
        ("GET", "/indexes"),
        ("POST", "/search"),
        ("GET", "/items/images/img0"),
        ("POST", "/v1/embeddings"),
    ):
        res = httpx.request(method, f"{url}{path}")
        assert res.status_code == 401 and "API key" in res.json()["error"], (path, res.text)
    ok = httpx.get(f"{url}/indexes", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and len(ok.json()["indexes"]) == 2
    assert httpx.get(f"{url}/indexes", cookies={"one_peace_key": "s3cret"}).status_code == 200
    assert httpx.get(f"{url}/indexes", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_a_non_loopback_bind_without_a_key_refuses_to_start(corpus, monkeypatch, tmp_path):
    from one_peace.serve.__main__ import main

    monkeypatch.delenv("ONE_PEACE_API_KEY", raising=False)
    with pytest.raises(SystemExit, match=r"host=0\.0\.0\.0 exposes the server .*ONE_PEACE_API_KEY"):
        main([f"index={corpus['root'] / 'images'}", "host=0.0.0.0"])
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SystemExit, match=r"api_key_file=.*empty"):
        main([f"index={corpus['root'] / 'images'}", "host=0.0.0.0", f"api_key_file={tmp_path / 'empty'}"])


# ---------------------------------------------------------------------------------- OpenAI embeddings API
def test_the_openai_client_gets_what_encode_gives(live, corpus):
    openai = pytest.importorskip("openai")
    url, _ = live
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret")
    assert "model" in [m.id for m in client.models.list()]
    texts = ["a red square", "a blue circle on a white background"]
    got = client.embeddings.create(model="model", input=texts)
    want = corpus["model"].encode("text", texts, output="numpy")
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want, atol=1e-5)
    assert got.usage.prompt_tokens > 0
    image = (corpus["root"] / "3.png").read_bytes()
    got = client.embeddings.create(
        model="images",
        input=[base64.b64encode(image).decode()],
        extra_body={"modality": "image"},
        encoding_format="float",
    )
    want = corpus["model"].encode("image", [image], output="numpy")
    np.testing.assert_allclose(np.array(got.data[0].embedding)[None], want, atol=1e-5)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.UnprocessableEntityError):  # a media item is base64, never a path
        client.embeddings.create(model="model", input=[str(corpus["root"] / "3.png")], extra_body={"modality": "image"})


def test_the_embeddings_route_refuses_bad_bodies(client):
    cases = [
        ({"model": "model"}, 400, "input"),
        ({"model": "model", "input": []}, 400, "input"),
        ({"model": "model", "input": [1, 2]}, 400, "input[0]"),
        ({"model": "model", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"model": "model", "input": [{"modality": "smell", "data": "AA=="}]}, 400, "smell"),
    ]
    for body, status, message in cases:
        res = client.post("/v1/embeddings", json=body)
        assert res.status_code == status and message in res.json()["error"], (body, res.text)
    res = client.post("/v1/embeddings", json={"model": "model", "input": "a red square", "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(res.json()["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (64,) and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-4


# ------------------------------------------------------------------------------------------- media serving
def test_thumbnails_of_shard_items_are_read_at_recorded_offsets_without_scanning_the_tar(corpus, monkeypatch):
    """/items scanned the whole shard and built its id table on the event loop: 2.6 s a thumbnail on a 20k shard."""
    import tarfile

    from fastapi.testclient import TestClient

    from one_peace.data.shards import write_shards
    from one_peace.embed import EmbedConfig, embed
    from one_peace.serve.app import create_app
    from one_peace.serve.service import SearchService

    root = corpus["root"]
    write_shards(root / "images.jsonl", root / "shards", shard_size=4)
    embed(
        EmbedConfig(
            checkpoint=str(corpus["checkpoint"]),
            data=str(root / "shards"),
            modality="image",
            out=str(root / "shard-index"),
            progress=False,
            workers=0,
        )
    )
    service = SearchService([str(root / "shard-index")])
    opened = []
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(a) or (_ for _ in ()).throw(AssertionError))
    try:
        with TestClient(create_app(service)) as c:
            for i in (0, 5):
                res = c.get(f"/items/shard-index/img{i}")
                assert res.status_code == 200, res.text
                assert res.content == (root / f"{i}.png").read_bytes() and res.headers["content-type"] == "image/png"
            assert c.get("/items/shard-index/nope").status_code == 404
    finally:
        service.close()
    assert opened == []
