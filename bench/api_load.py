"""Load on the REST API over loopback HTTP, against the issue's targets.

Starts `vopd serve --no-worker` in its own process in a temporary VOPD_HOME, with no worker, so jobs stay queued and
only the API is measured. `--backend embedded` (the default) runs on the newcomer's defaults (SQLite database, SQLite
broker; or DATABASE_URL / REDIS_URL when set); `--backend postgres` runs the scaled-out configuration: a fresh
PostgreSQL database (created on `--pg-admin-url`, dropped afterwards) and Redis (`--redis-url`) as the broker.

    POST /api/jobs            p50 / p99 latency (row + publish to the broker)      target p99 < 50 ms
    GET  /api/jobs/{id}       requests per second, a few concurrent clients         target >= 300 req/s
    POST /api/inspect         p50 latency, 32 new tokens on the tiny model          target p50 < 1 s

    python bench/api_load.py [--posts 200] [--gets 2000] [--clients 4] [--inspects 8]
    python bench/api_load.py --backend postgres      # PostgreSQL at 127.0.0.1:5432 (user postgres) + Redis

Prints a table and ends with one JSON line: submit_p99_ms, status_rps, inspect_p50_s (and the backend).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import secrets
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from PIL import Image


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(port: int, log_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`vopd serve` in its own process (as users run it), so client and server do not share a GIL."""
    from app.serve import vopd_command

    command = vopd_command("serve", "--host", "127.0.0.1", "--port", str(port), "--no-worker", "--no-ui")
    with log_path.open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    key_file = Path(env["VOPD_HOME"]) / "local_api_key"  # the banner names this file, never the key
    while time.monotonic() < deadline:
        key = key_file.read_text().strip() if key_file.is_file() else ""
        try:
            if key and httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return server, key
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("vopd serve did not start:\n" + log_path.read_text())


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _image_base64() -> str:
    image = Image.new("RGB", (112, 112), (230, 230, 230))
    image.paste((200, 30, 30), (50, 50, 62, 62))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@contextlib.contextmanager
def _postgres_and_redis(admin_url: str, redis_url: str) -> Iterator[dict[str, str]]:
    """A fresh PostgreSQL database for this run (dropped afterwards) and Redis; yields the server's environment.

    The queued job messages this run leaves in Redis (no worker consumes them) are deleted afterwards; keys that were
    there before are left alone."""
    import redis
    from sqlalchemy import create_engine, text

    name = f"vopd_bench_{secrets.token_hex(4)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
    client.ping()
    keys_before = set(client.scan_iter())
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield {"DATABASE_URL": admin_url.rsplit("/", 1)[0] + f"/{name}", "REDIS_URL": redis_url}
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        for key in set(client.scan_iter()) - keys_before:
            client.delete(key)
        client.close()


def _measure(args: argparse.Namespace, base: str, key: str) -> tuple[list[tuple[str, str, str]], dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"}
    body = {"kind": "train", "config": {"model": "tiny", "dataset": "synth-64", "steps": 2}}
    rows = []
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        for _ in range(5):  # warm the connection pools
            client.post("/api/jobs", json=body).raise_for_status()
        post_ms = []
        for _ in range(args.posts):
            start = time.perf_counter()
            response = client.post("/api/jobs", json=body)
            post_ms.append((time.perf_counter() - start) * 1000)
            response.raise_for_status()
        job_id = response.json()["id"]
    p99 = _percentile(post_ms, 0.99)
    figures: dict[str, Any] = {"submit_p50_ms": round(statistics.median(post_ms), 2), "submit_p99_ms": round(p99, 2)}
    rows.append(("POST /api/jobs p50", f"{statistics.median(post_ms):.1f} ms", ""))
    rows.append(("POST /api/jobs p99", f"{p99:.1f} ms", f"< 50 ms: {'ok' if p99 < 50 else 'MISSED'}"))

    def get_many(count: int) -> None:
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            for _ in range(count):
                client.get(f"/api/jobs/{job_id}").raise_for_status()

    per_client = max(1, args.gets // args.clients)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(get_many, [per_client] * args.clients))
    rate = per_client * args.clients / (time.perf_counter() - start)
    figures["status_rps"] = round(rate, 1)
    rows.append(("GET /api/jobs/{id}", f"{rate:.0f} req/s", f">= 300 req/s: {'ok' if rate >= 300 else 'MISSED'}"))

    if args.inspects:
        inspect = {
            "model": "tiny",
            "image_base64": _image_base64(),
            "question": "What color is the square inside the box?",
            "options": ["red", "green", "blue", "yellow"],
            "bbox": [40, 40, 72, 72],
            "max_new_tokens": 32,
        }
        with httpx.Client(base_url=base, headers=headers, timeout=300) as client:
            client.post("/api/inspect", json=inspect).raise_for_status()  # loads and caches the model
            inspect_s = []
            for _ in range(args.inspects):
                start = time.perf_counter()
                result = client.post("/api/inspect", json=inspect)
                inspect_s.append(time.perf_counter() - start)
                result.raise_for_status()
        p50 = statistics.median(inspect_s)
        figures["inspect_p50_s"] = round(p50, 3)
        label = f"POST /api/inspect p50 ({len(result.json()['tokens'])} tokens)"
        rows.append((label, f"{p50 * 1000:.0f} ms", f"< 1 s: {'ok' if p50 < 1 else 'MISSED'}"))
    return rows, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=200, help="POST /api/jobs requests (sequential)")
    parser.add_argument("--gets", type=int, default=2000, help="GET /api/jobs/{id} requests")
    parser.add_argument("--clients", type=int, default=4, help="concurrent GET clients")
    parser.add_argument("--inspects", type=int, default=8, help="inspect requests after one warm-up (0 = skip)")
    parser.add_argument("--backend", choices=["embedded", "postgres"], default="embedded")
    parser.add_argument(
        "--pg-admin-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="a PostgreSQL URL allowed to CREATE DATABASE (--backend postgres)",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="Redis broker (--backend postgres)")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        home = stack.enter_context(tempfile.TemporaryDirectory())
        env = {**os.environ, "VOPD_HOME": os.environ.get("VOPD_HOME", home)}
        if args.backend == "postgres":
            env.update(stack.enter_context(_postgres_and_redis(args.pg_admin_url, args.redis_url)))
        port = _free_port()
        server, key = _start_server(port, Path(home) / "serve.log", env)
        try:
            rows, figures = _measure(args, f"http://127.0.0.1:{port}", key)
        finally:
            server.terminate()
            server.wait(30)

    database = env.get("DATABASE_URL", "SQLite (embedded)").split("@")[-1]
    broker = "Redis" if env.get("REDIS_URL") else "SQLite broker (embedded)"
    print(f"\nAPI load over loopback: database {database}, broker {broker}, {os.cpu_count()} CPUs\n")
    width = max(len(row[0]) for row in rows)
    print(f"| {'measure'.ljust(width)} | value      | target |")
    print(f"|{'-' * (width + 2)}|------------|--------|")
    for name, value, target in rows:
        print(f"| {name.ljust(width)} | {value.ljust(10)} | {target} |")
    print(json.dumps({"backend": args.backend, **figures}))


if __name__ == "__main__":
    main()
