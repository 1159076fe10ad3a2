"""Load test of `flashlite serve` on this machine's loopback: ordinary requests from many clients with slow and
oversized ones mixed in; reports throughput, p50 / p99 latency, how the abusive requests ended and the server's
peak RSS.

    python tools/load_server.py -m tiny_v4.gguf [--clients 16] [--duration 20] [--slow 0.1] [--oversized 0.1]
    python tools/load_server.py --url http://127.0.0.1:8080 [--pid PID] ...    (a server already running)

With -m it starts `flashlite serve` itself (--port 0, -np, --idle-timeout passed on) and stops it at the end;
with --url, --pid names the server's process for its RSS. Only loopback addresses are accepted, the run is
bounded (at most 300 s, 256 clients, 100,000 requests, each abusive request given up after 60 s) and it stops by
itself. Ordinary requests (--kind) are chat completions (alternately streamed), raw completions or GET /health.
Slow requests: a head sent a line per second (slowloris), a body a few bytes per second, a connection that sends
nothing. Oversized ones: a 31 MB body of spaces announced by its Content-Length, the same sent chunked without a
length, JSON nested 100,000 deep, a prompt twice the context.
"""
from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

LIMITS = {"duration": 300.0, "clients": 256, "requests": 100_000, "abuse_s": 60.0}
BIG = 31 << 20
MESSAGES = [{"role": "user", "content": "Name three colours of the sea."}]


def loopback(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if parts.scheme != "http" or not ok:
        raise SystemExit(f"--url must be http:// on a loopback address (127.0.0.0/8, ::1, localhost), got {url}")
    return host, parts.port or 80


def rss_kb(pid: int | None, field: str) -> int | None:
    """VmHWM (peak) or VmRSS of a process, in kB, from /proc."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


def cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds a process has used, from /proc."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


class Run:
    def __init__(self, args, host: str, port: int, api_key: str | None):
        self.args, self.host, self.port = args, host, port
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.deadline = time.monotonic() + args.duration
        self.lock = threading.Lock()
        self.normal: list[tuple[float, int, int]] = []  # (latency s, status, completion tokens)
        self.failures: dict[str, int] = defaultdict(int)
        self.abuse: dict[str, list[tuple[float, str]]] = defaultdict(list)  # kind -> (seconds, how it ended)
        self.count = 0
        self.ctx = None

    def take(self) -> bool:
        with self.lock:
            if self.count >= LIMITS["requests"] or time.monotonic() >= self.deadline:
                return False
            self.count += 1
            return True

    # -- ordinary requests --

    def ordinary(self, conn_box: list, n: int) -> None:
        kind = self.args.kind
        if kind == "health":
            method, path, body = "GET", "/health", None
        elif kind == "completions":
            method, path = "POST", "/v1/completions"
            body = {"prompt": "The sea is", "max_tokens": self.args.max_tokens, "seed": n}
        else:
            method, path = "POST", "/v1/chat/completions"
            body = {"messages": MESSAGES, "max_tokens": self.args.max_tokens, "seed": n, "stream": n % 2 == 1}
        started = time.perf_counter()
        try:
            for attempt in (0, 1):
                reused = conn_box[0] is not None
                if not reused:
                    conn_box[0] = http.client.HTTPConnection(self.host, self.port, timeout=120)
                conn = conn_box[0]
                try:
                    conn.request(method, path, None if body is None else json.dumps(body), self.headers)
                    response = conn.getresponse()
                    break
                except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                    conn.close()  # a kept-alive connection the server closed while idle: once more on a new one
                    conn_box[0] = None
                    if not reused or attempt:
                        raise
            raw = response.read()
            tokens = 0
            if response.status == 200 and body is not None:
                if body.get("stream"):
                    last = [line for line in raw.split(b"\n") if line.startswith(b"data: {")][-1]
                    tokens = json.loads(last[6:])["usage"]["completion_tokens"]
                else:
                    tokens = json.loads(raw)["usage"]["completion_tokens"]
            if response.getheader("connection", "").lower() == "close":
                conn.close()
                conn_box[0] = None
        except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as exc:
            if conn_box[0] is not None:
                conn_box[0].close()
            conn_box[0] = None
            with self.lock:
                self.failures[type(exc).__name__] += 1
            return
        with self.lock:
            self.normal.append((time.perf_counter() - started, response.status, tokens))

    # -- abusive requests --

    def _sock(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=LIMITS["abuse_s"])
        sock.settimeout(2.0)
        return sock

    def _ended(self, sock: socket.socket, started: float, until: float) -> str:
        """Wait for the server's answer or its close: 'HTTP status', 'closed', or 'open' at `until`."""
        got = b""
        while time.monotonic() < until:
            try:
                part = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return "reset"
            if not part:
                break
            got += part
            if b"\r\n\r\n" in got:
                break
        if got.startswith(b"HTTP/1.1 "):
            return got[9:12].decode()
        return "closed" if time.monotonic() < until else "open"

    def slow(self, kind: str) -> None:
        started = time.monotonic()
        until = started + LIMITS["abuse_s"]
        auth = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items()).encode()
        try:
            sock = self._sock()
        except OSError:
            self.abuse[kind].append((0.0, "refused"))
            return
        with sock:
            how = None
            try:
                if kind == "slowloris":
                    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                    while time.monotonic() < until:
                        sock.sendall(b"X-Slow: %d\r\n" % int(time.monotonic()))
                        time.sleep(1.0)
                elif kind == "slow body":
                    body = json.dumps({"messages": MESSAGES, "max_tokens": 1}).encode()
                    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n"
                                 % (auth, len(body) + 4096))
                    while time.monotonic() < until:
                        sock.sendall(b" ")
                        time.sleep(1.0)
                # "idle": nothing at all
            except OSError:
                how = "closed"
            how = how or self._ended(sock, started, until)
        with self.lock:
            self.abuse[kind].append((time.monotonic() - started, how))

    def oversized(self, kind: str) -> None:
        started = time.monotonic()
        until = started + LIMITS["abuse_s"]
        auth = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items() if k != "Content-Type").encode()
        sent = 0
        try:
            sock = self._sock()
        except OSError:
            self.abuse[kind].append((0.0, "refused"))
            return
        with sock:
            how = None
            try:
                if kind in ("31 MB body", "31 MB chunked"):
                    chunked = kind.endswith("chunked")
                    length = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % BIG
                    head = b'{"messages": [{"role": "user", "content": "'
                    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                 b"\r\n%s%s\r\n" % (auth, length))
                    block = head + b" " * (65536 - len(head))
                    sock.setblocking(False)
                    while sent < BIG and time.monotonic() < until:
                        data = b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
                        try:
                            sock.sendall(data)
                        except BlockingIOError:
                            pass  # the server does not read: it has answered, or is about to
                        sent += len(block)
                        block = b" " * 65536
                        if self._answered(sock):
                            break
                    sock.setblocking(True)
                    sock.settimeout(2.0)
                else:
                    if kind == "deep JSON":
                        body = b"[" * 100_000 + b"]" * 100_000
                    else:  # a prompt twice the context
                        body = json.dumps({"messages": [{"role": "user", "content": "word " * (2 * (self.ctx or 4096))}]
                                           }).encode()
                    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                 b"\r\n%sContent-Length: %d\r\n\r\n" % (auth, len(body)))
                    sock.sendall(body)
                    sent = len(body)
            except OSError:
                how = "closed"
            how = self._ended(sock, started, until) if how is None else how
        with self.lock:
            self.abuse[kind].append((time.monotonic() - started, f"{how} after {sent >> 10} KiB"))

    @staticmethod
    def _answered(sock: socket.socket) -> bool:
        try:
            return bool(sock.recv(1, socket.MSG_PEEK))
        except BlockingIOError:
            return False
        except OSError:
            return True

    def client(self, n: int) -> None:
        rng = random.Random(n)
        conn_box = [None]
        i = 0
        while self.take():
            roll = rng.random()
            if roll < self.args.slow:
                self.slow(rng.choice(["slowloris", "slow body", "idle"]))
            elif roll < self.args.slow + self.args.oversized:
                self.oversized(rng.choice(["31 MB body", "31 MB chunked", "deep JSON", "long prompt"]))
            else:
                self.ordinary(conn_box, n * 1_000_000 + i)
            i += 1
        if conn_box[0] is not None:
            conn_box[0].close()


def spawn(args) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "flashlite.cli", "serve", "-m", args.model, "--port", "0", "-np",
               str(args.parallel), "--idle-timeout", str(args.idle_timeout)]
    if args.threads:
        command += ["-t", str(args.threads)]
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()
    match = re.search(r"at (http://\S+)/v1", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, match.group(1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="GGUF to serve (starts `flashlite serve` for the run)")
    ap.add_argument("--url", help="a server already running, on loopback")
    ap.add_argument("--pid", type=int, help="with --url: the server's process id, for its RSS")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds new requests start for")
    ap.add_argument("--kind", choices=["chat", "completions", "health"], default="chat")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--slow", type=float, default=0.1, help="share of slow requests")
    ap.add_argument("--oversized", type=float, default=0.1, help="share of oversized requests")
    ap.add_argument("-np", "--parallel", type=int, default=4, help="with -m: slots")
    ap.add_argument("--idle-timeout", type=float, default=15.0, help="with -m: the server's --idle-timeout")
    ap.add_argument("-t", "--threads", type=int, default=None, help="with -m: the server's threads")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = ap.parse_args(argv)
    if (args.model is None) == (args.url is None):
        ap.error("give exactly one of -m and --url")
    if not 1 <= args.clients <= LIMITS["clients"] or not 0 < args.duration <= LIMITS["duration"]:
        ap.error(f"--clients must be 1..{LIMITS['clients']}, --duration in (0, {LIMITS['duration']:.0f}] s")
    if args.slow < 0 or args.oversized < 0 or args.slow + args.oversized > 1:
        ap.error("--slow and --oversized are shares that add up to at most 1")

    proc = None
    if args.model:
        proc, url = spawn(args)
        pid = proc.pid
    else:
        url, pid = args.url, args.pid
    host, port = loopback(url)
    try:
        run = Run(args, host, port, args.api_key)
        try:  # the context, for the long prompt
            conn = http.client.HTTPConnection(host, port, timeout=30)
            conn.request("GET", "/v1/models", headers=run.headers)
            run.ctx = json.loads(conn.getresponse().read())["data"][0].get("meta", {}).get("n_ctx")
            conn.close()
        except (OSError, ValueError, KeyError, IndexError, http.client.HTTPException):
            pass
        rss_start = rss_kb(pid, "VmRSS")
        cpu_start = cpu_s(pid)
        started = time.perf_counter()
        threads = [threading.Thread(target=run.client, args=(n,), daemon=True) for n in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(1.0, run.deadline - time.monotonic()) + LIMITS["abuse_s"] + 60)
        wall = time.perf_counter() - started
        peak = rss_kb(pid, "VmHWM")
        cpu = cpu_s(pid)
        cpu = None if cpu is None or cpu_start is None else cpu - cpu_start
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    ok = [r for r in run.normal if r[1] == 200]
    latencies = [r[0] for r in ok]
    report = {
        "server": url, "clients": args.clients, "seconds": round(wall, 1), "kind": args.kind,
        "ok": len(ok), "non_200": len(run.normal) - len(ok), "failed": dict(run.failures),
        "requests_per_s": round(len(ok) / wall, 2), "tokens_per_s": round(sum(r[2] for r in ok) / wall, 1),
        "p50_s": round(percentile(latencies, 50), 4), "p99_s": round(percentile(latencies, 99), 4),
        "mean_s": round(sum(latencies) / len(latencies), 4) if latencies else float("nan"),
        "rss_start_mb": rss_start and round(rss_start / 1024), "rss_peak_mb": peak and round(peak / 1024),
        "server_cpu_ms_per_request": cpu and ok and round(1000 * cpu / len(ok), 3),
        "abuse": {kind: {"n": len(v), "p50_s": round(percentile([s for s, _ in v], 50), 3),
                         "max_s": round(max(s for s, _ in v), 3),
                         "ended": sorted({how.split(' after ')[0] for _, how in v})}
                  for kind, v in sorted(run.abuse.items())},
    }
    print(f"{args.clients} clients for {wall:.1f} s against {url} ({args.kind}, {args.slow:.0%} slow, "
          f"{args.oversized:.0%} oversized)")
    print(f"  ordinary: {len(ok)} ok, {report['non_200']} not 200, {sum(run.failures.values())} failed "
          f"{dict(run.failures) or ''}; {report['requests_per_s']} req/s, {report['tokens_per_s']} tok/s; "
          f"latency p50 {report['p50_s']} s, p99 {report['p99_s']} s, mean {report['mean_s']} s")
    for kind, row in report["abuse"].items():
        print(f"  {kind}: {row['n']}, ended {', '.join(row['ended'])} after p50 {row['p50_s']} s (max "
              f"{row['max_s']} s)")
    print(f"  server RSS: {report['rss_start_mb']} MB at the start, peak {report['rss_peak_mb']} MB; CPU "
          f"{report['server_cpu_ms_per_request']} ms per ordinary request")
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
