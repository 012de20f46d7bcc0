"""Real recipes through ``python -m one_peace.run`` for a fixed number of steps, then kill-and-resume: samples/s,
data-wait fraction and MFU from each run's ``metrics.jsonl`` (log intervals after the first, which holds start-up and
the FLOP count).

    python -m benchmarks.recipes --device cuda --json out.json          # on a GPU: base size, bf16-autocast
    python -m benchmarks.recipes --device cpu --size tiny --steps 20    # the same layout on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _args(recipe: str, args: argparse.Namespace, steps: int, out: Path) -> list[str]:
    size, device, batch = args.size, args.device, args.batch_size
    precision = "bf16-autocast" if device == "cuda" else "fp32"
    image_size = 224 if size != "tiny" else 64
    return [
        sys.executable,
        "-m",
        "one_peace.run",
        f"recipe={recipe}",
        f"model={size}",
        f"trainer.device={device}",
        f"trainer.precision={precision}",
        f"trainer.max_steps={steps}",
        f"trainer.batch_size={batch}",
        f"trainer.log_every={max(1, steps // 4)}",
        "trainer.warmup_steps=2",
        f"data.num_workers={args.workers}",
        f"data.worker_start={args.start}",
        f"data.image_size={image_size}",
        f"data.demo_train={max(512, 2 * batch)}",
        "data.demo_valid=64",
        f"output_dir={out}",
    ]


def _summary(out: Path) -> dict[str, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows
    return {
        key: statistics.mean(r[key] for r in later)
        for key in ("samples_per_s", "tokens_per_s", "data_wait", "mfu")
        if all(key in r for r in later)
    }


def run_recipe(args: argparse.Namespace, recipe: str, compiled: bool, root: Path) -> dict[str, object]:
    """One recipe run; its figures (or the tail of its error output)."""
    out = root / f"{recipe}-{'compiled' if compiled else 'eager'}"
    cmd = _args(recipe, args, args.steps, out)
    cmd += [f"trainer.compile={str(compiled).lower()}", f"trainer.save_every={args.steps}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    result: dict[str, object] = {"seconds": round(time.perf_counter() - t0, 1), "exit": done.returncode}
    if done.returncode != 0:
        result["error"] = done.stderr[-1500:]
        return result
    result.update(_summary(out))
    return result


def kill_and_resume(args: argparse.Namespace, root: Path) -> dict[str, object]:
    """pretrain_vl: SIGKILL after the mid-run checkpoint, resume; compare with an unbroken run at the end."""
    from safetensors.torch import load_file

    steps = max(4, args.steps // 2 * 2)
    outs = {"ref": root / "resume-ref", "killed": root / "resume-killed"}
    cmd = _args("pretrain_vl", args, steps, outs["ref"])
    cmd += [f"trainer.save_every={steps // 2}", "trainer.keep_last=5"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=args.timeout)
    killed = [c if not c.startswith("output_dir=") else f"output_dir={outs['killed']}" for c in cmd]
    proc = subprocess.Popen(killed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    mark = outs["killed"] / "checkpoints" / f"step_{steps // 2:07d}" / "COMPLETE"
    deadline = time.time() + args.timeout
    while not mark.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run([*killed, "trainer.resume=true"], check=True, capture_output=True, timeout=args.timeout)
    final = f"step_{steps:07d}"
    a = load_file(str(outs["ref"] / "checkpoints" / final / "model.safetensors"))
    b = load_file(str(outs["killed"] / "checkpoints" / final / "model.safetensors"))
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return {"steps": steps, "bitwise_equal": all(bool((a[k] == b[k]).all()) for k in a), "max_abs_diff": diff}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="base")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--start", default="forkserver", choices=("fork", "spawn", "forkserver"))
    p.add_argument("--recipes", nargs="+", default=["vl_contrastive", "pretrain_vl"])
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=("eager", "compiled"))
    p.add_argument("--timeout", type=int, default=240, help="seconds per run")
    p.add_argument("--skip-resume", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    results: dict[str, object] = {"args": vars(args) | {"json": str(args.json)}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for recipe in args.recipes:
            for mode in args.modes:
                try:
                    r = run_recipe(args, recipe, mode == "compiled", root)
                except subprocess.TimeoutExpired:
                    r = {"exit": "timeout"}
                results[f"{recipe}/{mode}"] = r
                print(f"{recipe:>15} {mode:>8}: {json.dumps(r)[:400]}", flush=True)
        if not args.skip_resume:
            try:
                results["kill_and_resume"] = kill_and_resume(args, root)
            except (subprocess.SubprocessError, OSError) as exc:
                results["kill_and_resume"] = {"error": str(exc)[-800:]}
            print(f"kill-and-resume: {results['kill_and_resume']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
