"""Load benchmark of `minivlm serve`: concurrent clients over loopback, with and without dynamic batching.

    python benchmarks/serve.py --model runs/demo/model --images runs/demo/world/val2014 \\
        [--clients 8] [--requests 160] [--seconds 120] [--max-batch 1 4 8] [--max-wait-ms 10] \\
        [--endpoint caption|vqa|chat] [--backend auto] [--out benchmarks/results/serve.json]

Each setting starts a fresh `minivlm serve` process on a free loopback port (so its memory is its own),
waits for /health, sends a few untimed warm-up requests, then:

  sequential      one client, one request at a time, --max-batch 1: the baseline
  batch B         --clients clients at once, each sending its next request when the last one is answered,
                  against a server started with --max-batch B

Every run stops after --requests requests or --seconds seconds, whichever comes first. Reported per row:
requests, errors (any status but 200, or a failed connection), throughput (answered requests per second of
wall time), p50 / p99 latency, and the server's resident memory (VmRSS) after the warm-up, after the first
half of the timed requests and after the second: memory that still grows in the second half is a leak,
memory that grows only in the first is the allocator settling at this concurrency.
The table goes to stdout and, as Markdown, beside --out; everything to --out as JSON. Only loopback is used.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


def request_body(endpoint: str, url: str) -> tuple[str, bytes]:
    if endpoint == "caption":
        return "/v1/caption", json.dumps({"image": url}).encode()
    if endpoint == "vqa":
        return "/v1/vqa", json.dumps({"image": url, "question": "what color is the star?"}).encode()
    return "/v1/chat/completions", json.dumps({"model": "minivlm", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}).encode()


class Server:
    """`minivlm serve` in a child process."""

    def __init__(self, args, max_batch: int):
        self.port = free_port()
        cmd = [sys.executable, "-m", "minivlm.cli", "serve", args.model, "--port", str(self.port),
               "--backend", args.backend, "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms),
               "--max-queue", str(max(64, 4 * args.clients)), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"minivlm serve exited: {self.proc.stderr.read()[-3000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > end:
                raise SystemExit("minivlm serve did not become ready in 10 minutes")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load(port: int, bodies: list[tuple[str, bytes]], clients: int, max_requests: int, seconds: float) -> dict:
    """`clients` threads on keep-alive connections; each sends the next body when its last is answered."""
    lock = threading.Lock()
    sent = [0]
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=max(60.0, seconds))
        while True:
            with lock:
                if sent[0] >= max_requests or time.monotonic() > deadline:
                    break
                path, body = bodies[sent[0] % len(bodies)]
                sent[0] += 1
            start = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
                reason = f"HTTP {r.status}"
            except OSError as err:
                ok, reason = False, f"{type(err).__name__}: {err}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=max(60.0, seconds))
            took = time.perf_counter() - start
            with lock:
                (latencies.append(took) if ok else errors.append(reason))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"latencies": latencies, "errors": errors, "wall_s": wall}


def merge(*runs: dict) -> dict:
    lat = sorted(x for r in runs for x in r["latencies"])
    errors = [e for r in runs for e in r["errors"]]
    wall = sum(r["wall_s"] for r in runs)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))] * 1000 if lat else float("nan")

    return {"requests": len(lat) + len(errors), "ok": len(lat), "errors": len(errors),
            "error_kinds": sorted(set(errors))[:5], "wall_s": round(wall, 3),
            "throughput_rps": round(len(lat) / wall, 3) if wall else 0.0,
            "p50_ms": round(pct(0.50), 1), "p99_ms": round(pct(0.99), 1),
            "mean_ms": round(statistics.fmean(lat) * 1000, 1) if lat else float("nan")}


def run_setting(args, name: str, max_batch: int, clients: int, bodies) -> dict:
    server = Server(args, max_batch)
    try:
        load(server.port, bodies, clients, args.warmup, 600)  # untimed: first calls allocate and compile
        before = rss_mb(server.proc.pid)
        # two halves, with the memory read between them: growth that goes on in the second half is a
        # leak, growth that stops after the first is the allocator settling
        first = load(server.port, bodies, clients, args.requests // 2, args.seconds / 2)
        mid = rss_mb(server.proc.pid)
        second = load(server.port, bodies, clients, args.requests - args.requests // 2, args.seconds / 2)
        after = rss_mb(server.proc.pid)
    finally:
        server.stop()
    result = merge(first, second)
    row = {"setting": name, "max_batch": max_batch, "clients": clients, **result, "rss_before_mb": round(before, 1),
           "rss_mid_mb": round(mid, 1), "rss_after_mb": round(after, 1),
           "rss_growth_second_half_mb": round(after - mid, 1)}
    print(f"  {name}: {row['throughput_rps']} req/s, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
          f"{row['errors']} errors, RSS {row['rss_before_mb']} -> {row['rss_mid_mb']} -> {row['rss_after_mb']} MB",
          flush=True)
    return row


def table(rows: list[dict]) -> str:
    base = rows[0]["throughput_rps"] or float("nan")
    lines = ["| setting | clients | max-batch | requests | errors | throughput (req/s) | vs sequential | p50 (ms) | "
             "p99 (ms) | RSS after warm-up → half → end (MB) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['clients']} | {r['max_batch']} | {r['requests']} | {r['errors']} | "
                     f"{r['throughput_rps']:.2f} | {r['throughput_rps'] / base:.2f}x | {r['p50_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} | {r['rss_before_mb']:.0f} → {r['rss_mid_mb']:.0f} → {r['rss_after_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--images", required=True, help="folder of images the requests cycle through")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients for the batched rows")
    p.add_argument("--requests", type=int, default=160, help="timed requests per row (at most)")
    p.add_argument("--seconds", type=float, default=120.0, help="time per row (at most)")
    p.add_argument("--warmup", type=int, default=16, help="untimed requests first (at full concurrency)")
    p.add_argument("--max-batch", type=int, nargs="+", default=[1, 4, 8], help="the --max-batch settings")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--endpoint", choices=["caption", "vqa", "chat"], default="caption")
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto")
    p.add_argument("--n-images", type=int, default=32, help="distinct images the requests cycle through")
    p.add_argument("--out", default="benchmarks/results/serve.json")
    args = p.parse_args(argv)

    files = sorted(f for f in Path(args.images).iterdir() if f.suffix.lower() in SUFFIXES)[: args.n_images]
    if not files:
        raise SystemExit(f"{args.images}: no images")
    bodies = [request_body(args.endpoint, "data:image/{};base64,{}".format(
        "jpeg" if f.suffix.lower() in (".jpg", ".jpeg") else f.suffix.lower()[1:], base64.b64encode(f.read_bytes()).decode()))
        for f in files]
    print(f"{len(files)} images, {args.endpoint}, model {args.model}", flush=True)
    rows = [run_setting(args, "sequential", 1, 1, bodies)]
    for b in args.max_batch:
        rows.append(run_setting(args, f"batch {b}", b, args.clients, bodies))
    md = table(rows)
    print(md)
    doc = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "settings": {k: v for k, v in vars(args).items()}, "rows": rows, "table": md}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(md + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
