import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def setns(fd, t=0x40000000):
    assert libc.setns(fd, t) == 0, ctypes.get_errno()
import sys, os, json, time, socket, subprocess, random, statistics, re
sys.path.insert(0, "/tmp/repl-research"); from qmp import *
D = "/tmp/repl-research"
def lat(q, n, dev="vol0", pat=0x5a, span_mb=1000, seed=1):
    """n sequential 4k writes through HMP qemu-io on the BlockBackend; returns QMP round-trip ms list."""
    rnd = random.Random(seed); out = []
    for i in range(n):
        off = rnd.randrange(0, span_mb * 256) * 4096
        t = time.monotonic()
        r = q.hmp(f'qemu-io {dev} "write -P 0x{pat:02x} {off} 4k"', quiet=True)
        out.append((time.monotonic() - t) * 1000)
        assert "error" not in r and "failed" not in r["return"], r
    return out
def summ(xs):
    xs = sorted(xs); return "n=%d p50=%.2fms p90=%.2fms p99=%.2fms max=%.2fms" % (len(xs), xs[len(xs)//2], xs[int(len(xs)*.9)], xs[min(len(xs)-1,int(len(xs)*.99))], xs[-1])
def connect_b(addr="10.231.0.2", port=10809, ns="rr-a"):
    """a TCP connection to B made in namespace ns (via setns), returned as an fd"""
    fdns = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    me = os.open("/proc/self/ns/net", os.O_RDONLY)
    setns(fdns)
    try:
        s = socket.create_connection((addr, port), timeout=5); s.settimeout(None)
    finally:
        setns(me)
    return s
