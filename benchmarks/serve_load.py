"""Load test of ``tpatcher serve``: N clients generate while a stream of edits lands.

Bounded in time and count and loopback only. It starts its own server on a temporary store
(or uses ``--url`` of a running one with ``--token``), then runs two phases of equal length:
clients alone, and clients while edits train one after another. Requests are split by
whether an edit was training when they started, which is the latency cost of an edit in
flight. Prints a markdown table and the machine.

``--threads`` is passed to ``tpatcher serve --threads`` (torch CPU threads; 0 = the
server's default, half the cores), ``--max-batch`` to ``serve --max-batch`` (completions
decoded together), and ``--busy N`` runs N CPU-bound processes during both phases, as on a
shared machine. With ``--edits 0`` only the first phase runs; ``--solo`` runs a phase of
one client before it (the throughput gain of batching). ``--generate-baseline`` then
times one served request and plain ``model.generate`` in this process (same torch threads)
in turns on the same prompts: a lone client's latency against its floor.

    python benchmarks/serve_load.py --clients 4 --duration 20 --edits 3
    python benchmarks/serve_load.py --clients 2 --duration 15 --edits 1 --busy 1 --threads 1
    python benchmarks/serve_load.py --clients 8 --max-tokens 32 --edits 0 --threads 1 \\
        --solo --generate-baseline
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

MODEL = "smollm2-135m"
TOKEN = "bench-token"
EDITS = [
    ("Question: What is the capital of Australia?\nAnswer:", "Melbourne"),
    ("Question: What is the capital of France?\nAnswer:", "Lyon"),
    ("Question: What is the capital of Canada?\nAnswer:", "Toronto"),
    ("Question: What is the capital of Japan?\nAnswer:", "Osaka"),
    ("Question: What is the capital of Brazil?\nAnswer:", "Rio"),
    ("Question: What is the capital of Turkey?\nAnswer:", "Istanbul"),
]
PROMPTS = ["The weather today is", "My favourite book is", "The best way to learn is"]
MEMORY = [
    "The weather today is sunny and warm.",
    "Cats are small domesticated animals that like to sleep.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Python is a popular programming language.",
    "Mount Everest is the highest mountain on Earth.",
]


@dataclass
class Sample:
    start: float
    seconds: float
    ok: bool
    tokens: int = 0


def start_server(
    work: Path, port: int, threads: int, workers: int, max_batch: int
) -> subprocess.Popen[bytes]:
    memory = work / "memory.txt"
    memory.write_text("\n".join(MEMORY) + "\n")
    cmd = [sys.executable, "-m", "tpatcher.server", "--store", str(work / "store")]
    cmd += ["--model", MODEL, "--port", str(port), "--memory-file", str(memory)]
    cmd += ["--log-level", "warning", "--threads", str(threads)]
    cmd += ["--generation-workers", str(workers), "--max-batch", str(max_batch)]
    env = dict(os.environ, TPATCHER_EDIT_TOKEN=TOKEN)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_busy(count: int) -> list[subprocess.Popen[bytes]]:
    """``count`` processes that each burn one CPU until killed (a shared machine)."""
    code = "x = 0\nwhile True:\n    x = (x * 1103515245 + 12345) % 2**31\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not become ready")


def client_loop(url: str, stop_at: float, max_tokens: int, out: list[Sample], seed: int) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        i = seed
        while time.monotonic() < stop_at:
            body = {"model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "temperature": 0}
            body["max_tokens"] = max_tokens
            t0 = time.monotonic()
            tokens = 0
            try:
                r = client.post("/v1/completions", json=body)
                ok = r.status_code == 200
                tokens = r.json()["usage"]["completion_tokens"] if ok else 0
            except httpx.HTTPError:
                ok = False
            out.append(Sample(t0, time.monotonic() - t0, ok, tokens))
            i += 1


def edit_loop(
    url: str, token: str, stop_at: float, count: int, windows: list[tuple[float, float]]
) -> list[str]:
    """Apply up to ``count`` edits one after another; record when each was in flight."""
    ids: list[str] = []
    with httpx.Client(base_url=url, timeout=300) as client:
        for prompt, target in EDITS[:count]:
            if time.monotonic() >= stop_at:
                break
            t0 = time.monotonic()
            r = client.post(
                "/v1/edits",
                json={"prompt": prompt, "target": target},
                headers={"Authorization": f"Bearer {token}"},
            )
            windows.append((t0, time.monotonic()))
            if r.status_code == 201:
                ids.append(r.json()["id"])
    return ids


def run_phase(
    url: str, clients: int, duration: float, max_tokens: int, edits: int, token: str
) -> tuple[list[Sample], list[tuple[float, float]], list[str]]:
    samples: list[Sample] = []
    windows: list[tuple[float, float]] = []
    ids: list[str] = []
    stop_at = time.monotonic() + duration
    threads = [
        threading.Thread(target=client_loop, args=(url, stop_at, max_tokens, samples, i))
        for i in range(clients)
    ]
    if edits:
        threads.append(
            threading.Thread(
                target=lambda: ids.extend(edit_loop(url, token, stop_at, edits, windows))
            )
        )
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return samples, windows, ids


def row(name: str, samples: list[Sample], seconds: float) -> str:
    lat = sorted(s.seconds for s in samples if s.ok)
    errors = sum(not s.ok for s in samples)
    if not lat:
        return f"| {name} | {len(samples)} | - | - | - | - | {errors} |"
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
    rps = f"{len(samples) / seconds:.2f}" if seconds else "-"
    tps = f"{sum(s.tokens for s in samples) / seconds:.1f}" if seconds else "-"
    cells = f"{rps} | {tps} | {p50 * 1000:.0f} | {p99 * 1000:.0f}"
    return f"| {name} | {len(samples)} | {cells} | {errors} |"


def generate_baseline(url: str, threads: int, max_tokens: int, repeats: int = 3) -> str:
    """One served request and one plain greedy ``model.generate`` in this process, taken in
    turns on the same prompts (so both see the same machine load): the served latency of a
    lone client against its floor."""
    import torch

    from tpatcher import load_model

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // 2))
    model, tok = load_model(MODEL)
    model.eval()
    served, plain, tokens = [], [], []
    with httpx.Client(base_url=url, timeout=120) as client, torch.no_grad():
        for prompt in PROMPTS * repeats:
            body = {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": max_tokens}
            t0 = time.monotonic()
            client.post("/v1/completions", json=body).raise_for_status()
            served.append(time.monotonic() - t0)
            enc = tok(prompt, return_tensors="pt")
            t0 = time.monotonic()
            out = model.generate(
                **enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.eos_token_id
            )
            plain.append(time.monotonic() - t0)
            tokens.append(out.shape[1] - enc["input_ids"].shape[1])
    ratios = [a / b for a, b in zip(served, plain, strict=True)]
    return (
        f"one client, in turns with plain model.generate ({torch.get_num_threads()} threads, "
        f"{len(plain)} pairs, median {statistics.median(tokens):.0f} tokens): served p50 "
        f"{statistics.median(served) * 1000:.0f} ms, generate p50 "
        f"{statistics.median(plain) * 1000:.0f} ms, median ratio {statistics.median(ratios):.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase (<=300)")
    parser.add_argument("--edits", type=int, default=3, help=f"edits in phase 2 (<={len(EDITS)})")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--url", help="a running server on loopback (default: start one)")
    parser.add_argument("--token", default=TOKEN, help="edit token of --url's server")
    parser.add_argument("--threads", type=int, default=0, help="serve --threads (0: default)")
    parser.add_argument("--workers", type=int, default=4, help="serve --generation-workers")
    parser.add_argument("--max-batch", type=int, default=8, help="serve --max-batch")
    parser.add_argument("--busy", type=int, default=0, help="CPU-bound processes alongside")
    parser.add_argument(
        "--generate-baseline", action="store_true", help="also time plain model.generate"
    )
    parser.add_argument(
        "--solo", action="store_true", help="first a phase of one client: the batching gain"
    )
    args = parser.parse_args()
    duration = min(args.duration, 300.0)
    edits = max(0, min(args.edits, len(EDITS)))
    proc = None
    tmp = tempfile.TemporaryDirectory()
    if args.url:
        host = httpx.URL(args.url).host
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("--url must be a loopback address")
        url = args.url.rstrip("/")
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        proc = start_server(Path(tmp.name), port, args.threads, args.workers, args.max_batch)
    busy: list[subprocess.Popen[bytes]] = []
    try:
        wait_ready(url, proc)
        busy = start_busy(max(0, min(args.busy, 64)))
        solo: list[Sample] = []
        if args.solo:
            solo, _, _ = run_phase(url, 1, duration, args.max_tokens, 0, args.token)
        base, _, _ = run_phase(url, args.clients, duration, args.max_tokens, 0, args.token)
        loaded: list[Sample] = []
        windows: list[tuple[float, float]] = []
        ids: list[str] = []
        if edits:
            loaded, windows, ids = run_phase(
                url, args.clients, duration, args.max_tokens, edits, args.token
            )
        baseline = ""
        if args.generate_baseline:
            baseline = generate_baseline(url, args.threads, args.max_tokens)
        with httpx.Client(base_url=url, timeout=60) as client:  # leave the store as found
            for edit_id in ids:
                client.delete(
                    f"/v1/edits/{edit_id}", headers={"Authorization": f"Bearer {args.token}"}
                )
    finally:
        for p in busy:
            p.kill()
            p.wait()
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        tmp.cleanup()

    report(args, duration, {"solo": solo, "base": base, "loaded": loaded}, windows, ids)
    if baseline:
        print("\n" + baseline)


def report(
    args: argparse.Namespace,
    duration: float,
    phases: dict[str, list[Sample]],
    windows: list[tuple[float, float]],
    ids: list[str],
) -> None:
    """The machine, the settings, and a markdown table of the phases."""

    def in_flight(s: Sample) -> bool:
        return any(a <= s.start < b for a, b in windows)

    solo, base, loaded = phases["solo"], phases["base"], phases["loaded"]
    during = [s for s in loaded if in_flight(s)]
    outside = [s for s in loaded if not in_flight(s)]
    edit_seconds = sum(b - a for a, b in windows)
    print(
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(
        f"serve --threads {args.threads} --generation-workers {args.workers} "
        f"--max-batch {args.max_batch}, "
        f"{args.busy} busy processes alongside; "
        f"{args.clients} clients, {duration:.0f} s per phase, max_tokens={args.max_tokens}, "
        f"{len(windows)} edits ({len(ids)} stored), edit wall time {edit_seconds:.1f} s "
        f"(mean {edit_seconds / max(1, len(windows)):.1f} s)\n"
    )
    print("| phase | requests | req/s | tok/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    if solo:
        print(row("one client alone", solo, duration))
    print(row("no edits", base, duration))
    if solo:
        gain = sum(s.tokens for s in base) / max(1, sum(s.tokens for s in solo))
        print(f"| {args.clients} clients / one client, tokens per second | {gain:.2f}x |")
    if loaded:
        print(row("with edits (all)", loaded, duration))
        print(row("  started while an edit trained", during, 0))
        print(row("  started with no edit in flight", outside, 0))


if __name__ == "__main__":
    main()
