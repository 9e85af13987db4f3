#!/usr/bin/env python3
"""The NBD relay's cost (docs/design/replication.md, section 5.2).

4 KiB writes at queue depth 1 (or DEPTH; `qemu-img bench -w`, QEMU's own
NBD client) into a qemu-nbd on 127.0.0.1, once straight over TCP and once
through `vroom __nbd-relay` (QEMU on a unix socket, the relay holding it and
the TCP connection), alternating, ROUNDS times each; prints the mean
latency per write of every run and the medians.

Usage: relay_bench.py VROOM_BINARY [COUNT] [ROUNDS] [CACHE] [DEPTH]
CACHE is qemu-nbd's --cache: writethrough (the replica's, one fdatasync per
write) or writeback (to see the relay's own cost without the fdatasync);
DEPTH is the queue depth (1).
"""
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

VROOM = sys.argv[1]
COUNT = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 5
CACHE = sys.argv[4] if len(sys.argv) > 4 else "writethrough"
DEPTH = sys.argv[5] if len(sys.argv) > 5 else "1"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_args(url):
    return ["qemu-img", "bench", "-f", "raw", "-w", "-d", DEPTH, "-s", "4096",
            "-c", str(COUNT), url]


def seconds(output):
    m = re.search(r"Run completed in ([0-9.]+) seconds", output)
    if not m:
        raise SystemExit(f"qemu-img bench said: {output}")
    return float(m.group(1))


def direct(port):
    out = subprocess.run(bench_args(f"nbd://127.0.0.1:{port}/vol0"),
                         capture_output=True, text=True, check=True).stdout
    return seconds(out)


def relayed(port, tmp, n):
    path = os.path.join(tmp, f"qemu{n}.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    client = subprocess.Popen(bench_args(f"nbd+unix:///vol0?socket={path}"),
                              stdout=subprocess.PIPE, text=True)
    qemu, _ = listener.accept()
    peer = socket.create_connection(("127.0.0.1", port))
    peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    q, p = qemu.fileno(), peer.fileno()

    def place():
        hq, hp = os.dup(q), os.dup(p)
        os.dup2(hq, 3)
        os.dup2(hp, 4)

    relay = subprocess.Popen(
        [VROOM, "__nbd-relay", "--qemu-fd", "3", "--peer-fd", "4",
         "--control", os.path.join(tmp, f"relay{n}.ctl")],
        preexec_fn=place, pass_fds=(3, 4), stderr=subprocess.DEVNULL)
    qemu.close()
    peer.close()
    out, _ = client.communicate()
    relay.wait(timeout=10)  # it ends when QEMU closes its end
    listener.close()
    return seconds(out)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        img = os.path.join(tmp, "replica.img")
        with open(img, "wb") as f:
            f.truncate(COUNT * 4096)
        port = free_port()
        server = subprocess.Popen(
            ["qemu-nbd", "-f", "raw", f"--cache={CACHE}", "-x", "vol0",
             "-t", "-e", "2", "-b", "127.0.0.1", "-p", str(port), img])
        try:
            for _ in range(500):
                try:
                    socket.create_connection(("127.0.0.1", port)).close()
                    break
                except OSError:
                    time.sleep(0.01)
            runs = {"direct": [], "relay": []}
            for n in range(ROUNDS):
                runs["direct"].append(direct(port) / COUNT * 1e6)
                runs["relay"].append(relayed(port, tmp, n) / COUNT * 1e6)
            print(f"{COUNT} x 4 KiB writes, QD{DEPTH}, qemu-nbd --cache={CACHE}; "
                  f"mean us per write, {ROUNDS} runs each")
            for name, values in runs.items():
                print(f"  {name:6} {' '.join(f'{v:7.1f}' for v in values)}"
                      f"   median {statistics.median(values):7.1f}")
            d, r = (statistics.median(runs[k]) for k in ("direct", "relay"))
            print(f"  relay - direct = {r - d:.1f} us ({r / d:.2f}x)")
        finally:
            server.terminate()
            server.wait()


main()
