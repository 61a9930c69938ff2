#!/usr/bin/env python3
"""The link emulator's own accuracy: a ping-pong through it against the configured RTT.

Usage: python3 bench/link-pingpong.py ADMIN_ADDR [PAYLOAD_BYTES] [SAMPLES]

ADMIN_ADDR is a running emulator's Toxiproxy API (`stretch up` prints it; or `stretch link
serve`). The script starts a local echo server, creates a proxy `pingpong` in front of it,
and for RTT 0, 1, 5 and 10 ms (half each way, as `stretch up --rtt`) prints the median and
the 10th/90th percentile of SAMPLES round trips of PAYLOAD_BYTES (default 4200: one 4 KiB
write frame). The "added" column is the median minus the RTT-0 median: what the emulator
adds, to compare with the setting. Loopback only; the proxy is deleted at the end.
"""
import json
import socket
import sys
import threading
import time
import urllib.request

ADMIN = sys.argv[1]
SIZE = int(sys.argv[2]) if len(sys.argv) > 2 else 4200
SAMPLES = int(sys.argv[3]) if len(sys.argv) > 3 else 200
NAME = "pingpong"


def echo_server():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def serve(conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            data = conn.recv(1 << 20)
            if not data:
                return
            conn.sendall(data)

    def accept():
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server.getsockname()[1]


def api(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{ADMIN}{path}", method=method, data=data,
                                 headers={"Content-Type": "application/json"})
    reply = urllib.request.urlopen(req, timeout=10).read()
    return json.loads(reply) if reply else None


def round_trips(addr):
    host, port = addr.rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=10)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * SIZE
    times = []
    for _ in range(SAMPLES):
        t0 = time.perf_counter()
        conn.sendall(msg)
        got = 0
        while got < SIZE:
            chunk = conn.recv(SIZE - got)
            if not chunk:
                raise SystemExit("the proxy closed the connection")
            got += len(chunk)
        times.append(time.perf_counter() - t0)
        time.sleep(0.002)  # an idle gap, as between QD1 writes
    conn.close()
    times.sort()
    return times[len(times) // 2], times[len(times) // 10], times[9 * len(times) // 10]


def main():
    port = echo_server()
    try:
        api("DELETE", f"/proxies/{NAME}")
    except Exception:
        pass
    addr = api("POST", "/proxies", {"name": NAME, "listen": "127.0.0.1:0",
                                    "upstream": f"127.0.0.1:{port}"})["listen"]
    try:
        base = None
        print(f"payload {SIZE} bytes, {SAMPLES} round trips per setting")
        print("| RTT set (ms) | p50 (ms) | p10 (ms) | p90 (ms) | added (ms) |")
        print("|---|---|---|---|---|")
        for rtt_ms in [0, 1, 5, 10]:
            for stream in ["upstream", "downstream"]:
                if rtt_ms:
                    api("POST", f"/proxies/{NAME}/toxics",
                        {"name": f"lat_{stream}", "type": "latency", "stream": stream,
                         "attributes": {"latency": rtt_ms / 2}})
            p50, p10, p90 = round_trips(addr)
            base = p50 if base is None else base
            print(f"| {rtt_ms} | {p50*1e3:.3f} | {p10*1e3:.3f} | {p90*1e3:.3f} | "
                  f"{(p50-base)*1e3:.3f} |")
            if rtt_ms:
                for stream in ["upstream", "downstream"]:
                    api("DELETE", f"/proxies/{NAME}/toxics/lat_{stream}")
    finally:
        api("DELETE", f"/proxies/{NAME}")


main()
