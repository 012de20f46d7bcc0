"""Load test of the search service on loopback: queries/s, p50/p99 latency and the server's peak RSS.

A tiny random text + image model and an index of ``--items`` images are made in a temporary folder; the server runs
as ``python -m one_peace.serve`` in a child process on 127.0.0.1. For each concurrency (``--clients``, default 1, 8
and 32) clients send a mix of text and image queries (one in ``--image-every`` is an image upload) for ``--seconds``;
then the same at 8 clients under a flood: ``--flood`` connections that send half a request line and stall, and
clients that send a query and hang up before the answer. The run stops itself (bounded in time and count) and prints
JSON; the server's peak RSS is its ``VmHWM``.

    python -m benchmarks.serve_load --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine


def _corpus(root: Path, items: int) -> tuple[Path, list[bytes]]:
    from one_peace.adapters.text import TextTokenizer
    from PIL import Image

    import one_peace
    from one_peace.embed import EmbedConfig, embed

    tok = TextTokenizer.train(["a red square on a black background", "a blue circle"] * 8, vocab_size=300)
    cfg = one_peace.model_config("tiny", ("text", "image"), layer_scale_init=1.0)
    cfg.modality_options = {"text": {"vocab_size": tok.vocab_size}, "image": {"image_size": 64}}
    model = one_peace.build_model(cfg).eval()
    model.tokenizer = tok
    checkpoint = one_peace.save(model, root / "model")
    rows, images = [], []
    for i in range(items):
        arr = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{i}.png")
        rows.append({"id": f"img{i}", "image": f"{i}.png"})
        if i < 16:
            images.append((root / f"{i}.png").read_bytes())
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "index"
    embed(
        EmbedConfig(
            checkpoint=str(checkpoint), data=str(root / "m.jsonl"), modality="image", out=str(out), progress=False
        )
    )
    return out, images


def _big_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (2000, 2000, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _clients(base: str, n: int, seconds: float, images: list[bytes], image_every: int) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stop = time.perf_counter() + seconds

    async def one(c: httpx.AsyncClient, k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            if i % image_every == 0:
                res = await c.post("/search", data={"top_k": "10"}, files={"image": ("q.png", images[i % len(images)])})
            else:
                res = await c.post("/search", data={"text": f"a red square number {i}", "top_k": "10"})
            latencies.append(time.perf_counter() - t0)
            statuses[res.status_code] = statuses.get(res.status_code, 0) + 1
            i += n

    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c, k) for k in range(n)))
        wall = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "clients": n,
        "queries": len(latencies),
        "queries_per_s": round(ok / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "statuses": statuses,
    }


async def _flood(port: int, seconds: float, stalled: int) -> dict[str, int]:
    """``stalled`` connections holding half a request line, and clients that ask and hang up, for ``seconds``."""
    held = []
    for _ in range(stalled):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /search HTTP/1.1\r\nHost: x\r\n")  # never finished
            held.append(writer)
        except OSError:
            break
    abandoned = 0
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            body = b"text=a+query+nobody+waits+for"
            writer.write(
                b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            writer.close()  # gone before the answer
            abandoned += 1
        except OSError:
            pass
        await asyncio.sleep(0.01)
    for w in held:
        w.close()
    return {"stalled_connections": len(held), "abandoned_requests": abandoned}


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--image-every", type=int, default=4)
    ap.add_argument("--flood", type=int, default=200, help="stalled connections during the flood run")
    args = ap.parse_args()
    import httpx

    with tempfile.TemporaryDirectory(prefix="one-peace-serve-load-") as tmp:
        index, images = _corpus(Path(tmp), args.items)
        port = _free_port()
        log = open(Path(tmp) / "server.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, "-m", "one_peace.serve", f"index={index}", f"port={port}", "header_timeout_s=5"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(400):
                try:
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.25)
            out: dict[str, Any] = {"machine": machine(), "items": args.items, "runs": []}
            out["idle_rss_mb"] = round(_peak_rss_mb(proc.pid), 1)
            for n in args.clients:
                run = asyncio.run(_clients(base, n, args.seconds, images, args.image_every))
                run["peak_rss_mb"] = round(_peak_rss_mb(proc.pid), 1)
                out["runs"].append(run)
                print(run, file=sys.stderr)

            big = _big_png()

            async def uploads() -> dict[str, int]:
                """4 clients uploading a 2000 x 2000 noise PNG (11.5 MB, decoded) for the whole run."""
                done: dict[str, int] = {}
                stop = time.perf_counter() + args.seconds

                async def one(c: httpx.AsyncClient) -> None:
                    while time.perf_counter() < stop:
                        res = await c.post("/search", files={"image": ("big.png", big)})
                        done[str(res.status_code)] = done.get(str(res.status_code), 0) + 1

                async with httpx.AsyncClient(base_url=base, timeout=120) as c:
                    await asyncio.gather(*(one(c) for _ in range(4)))
                return done

            async def flooded() -> dict[str, Any]:
                flood = asyncio.create_task(_flood(port, args.seconds, args.flood))
                big_uploads = asyncio.create_task(uploads())
                run = await _clients(base, 8, args.seconds, images, args.image_every)
                run.update(await flood)
                run["big_uploads"] = await big_uploads
                return run

            run = asyncio.run(flooded())
            run["flood"] = True
            time.sleep(1)
            run["peak_rss_mb"] = round(_peak_rss_mb(proc.pid), 1)
            run["health"] = httpx.get(f"{base}/health", timeout=5).json()
            out["runs"].append(run)
            print(run, file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
