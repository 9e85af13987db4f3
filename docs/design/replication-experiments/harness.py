from common import *
import threading, signal
procs = {}
def start_b(img=D+"/b.img", port=10809, extra=()):
    for f in [D+"/qsd.sock"]:
        if os.path.exists(f): os.unlink(f)
    p = subprocess.Popen(["ip", "netns", "exec", "rr-b", "python3", D+"/qsd_launch.py", "10.231.0.2", str(port), img, D+"/qsd.sock", *extra],
                         stdout=open(D+"/qsd.log", "a"), stderr=subprocess.STDOUT)
    procs["b"] = p
    for _ in range(100):
        if os.path.exists(D+"/qsd.sock"): break
        time.sleep(0.05)
    time.sleep(0.2)
    return p
def start_a(img=D+"/a.img", mode="drive"):
    for f in [D+"/a.sock", D+"/aio.sock"]:
        if os.path.exists(f): os.unlink(f)
    p = subprocess.Popen(["python3", D+"/a_launch.py", img, D+"/a.sock", mode], stdout=open(D+"/a.log", "a"), stderr=subprocess.STDOUT)
    procs["a"] = p
    q = QMP(D+"/a.sock", oob=True, name="A")
    qio = QMP(D+"/aio.sock", name="Aio", log=open(D+"/aio.log", "a"))
    return p, q, qio
def connect(q, name, user_timeout_ms=None):
    s = connect_b()
    if user_timeout_ms:
        s.setsockopt(socket.IPPROTO_TCP, 18, user_timeout_ms)  # TCP_USER_TIMEOUT
    getfd(q, name, s.fileno())
    return s  # keep our dup: TCP_INFO / shutdown from outside
def add_peer(q, gen, reconnect_delay=0, user_timeout_ms=None):
    s = connect(q, f"nbd{gen}", user_timeout_ms)
    args = {"driver": "nbd", "node-name": f"peer-nbd{gen}", "server": {"type": "fd", "str": f"nbd{gen}"}, "export": "vol0"}
    if reconnect_delay: args["reconnect-delay"] = reconnect_delay
    r = q.cmd("blockdev-add", args)
    assert "return" in r, r
    return s
def mirror(q, gen=1, **kw):
    s = add_peer(q, gen, **kw)
    q.cmd("blockdev-add", {"driver": "raw", "node-name": "peer", "file": f"peer-nbd{gen}"})
    t = time.monotonic()
    q.cmd("blockdev-mirror", {"job-id": "repl0", "device": "vol0", "target": "peer", "sync": "full",
          "copy-mode": "write-blocking", "on-target-error": "stop", "on-source-error": "stop", "auto-dismiss": False})
    e = q.wait_event("BLOCK_JOB_READY", timeout=600)
    print("READY after %.2f s" % (time.monotonic() - t), flush=True)
    return s
class Writer(threading.Thread):
    """sequential 4k writes through HMP qemu-io on the BlockBackend vol0; logs (start, duration, result)"""
    def __init__(self, qio, gap=0.05, base=512<<20, seed=7):
        super().__init__(daemon=True); self.qio = qio; self.gap = gap; self.log = []; self.stop = False; self.base = base; self.i = 0
    def run(self):
        while not self.stop:
            off = self.base + (self.i % 4096) * 4096 * 16; self.i += 1
            t = time.monotonic()
            r = self.qio.hmp(f'qemu-io vol0 "write -P 0x{(self.i % 200) + 20:02x} {off} 4k"', quiet=True)
            d = time.monotonic() - t
            self.log.append((t - T0, d, r.get("return", r)))
            if d > 0.5: print(f"[{ts()}] write #{self.i} at {off} took {d:.3f}s -> {str(r.get('return', r))[:100]!r}", flush=True)
            time.sleep(self.gap)
    def stats(self, t0, t1):
        xs = [d*1000 for (t, d, r) in self.log if t0 <= t < t1]
        return summ(xs) if xs else "none"
def nstat_b():
    out = subprocess.run(["ip", "netns", "exec", "rr-b", "cat", "/proc/net/netstat"], capture_output=True, text=True).stdout.split("\n")
    for i in range(0, len(out) - 1, 2):
        if out[i].startswith("IpExt"):
            k, v = out[i].split(), out[i+1].split()
            return int(v[k.index("InOctets")])
def jobs(q):
    return q.cmd("query-block-jobs", quiet=True)["return"]
def stop_all():
    for k, p in procs.items():
        try: p.kill(); p.wait(timeout=5)
        except Exception: pass

import atexit
atexit.register(stop_all)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
def export_a(q):
    """export A's volume (its format node, so writes pass the mirror filter once it is inserted) on a unix socket:
    the 'guest' for these tests is a qemu-io client on that export; the QEMU main loop stays free"""
    node = [b for b in q.cmd("query-block", quiet=True)["return"] if b["device"] == "vol0"][0]["inserted"]["node-name"]
    if os.path.exists(D+"/ax.sock"): os.unlink(D+"/ax.sock")
    q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": D+"/ax.sock"}}})
    q.cmd("block-export-add", {"type": "nbd", "id": "gx", "node-name": node, "name": "vol0", "writable": True})
    return node
class ExtWriter(threading.Thread):
    """the 'guest': qemu-io over NBD to A's export; sequential 4k writes, each timed"""
    def __init__(self, gap=0.05, base=512<<20, flush_every=0, wflags=""):
        self.wflags = wflags; self.seed = random.randrange(256)
        super().__init__(daemon=True); self.gap = gap; self.base = base; self.log = []; self.stop = False; self.i = 0; self.flush_every = flush_every
        self.p = subprocess.Popen(["qemu-io", "-f", "raw", f"nbd+unix:///vol0?socket={D}/ax.sock"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        procs[f"qemu-io-{id(self)}"] = self.p
    def op(self, line):
        t = time.monotonic(); self.p.stdin.write(line + "\n"); self.p.stdin.flush(); out = ""
        while True:
            l = self.p.stdout.readline()
            if not l: break
            out += l
            if "ops;" in l or "error" in l.lower() or "failed" in l.lower(): break
        return t, time.monotonic() - t, out
    def run(self):
        while not self.stop:
            off = self.base + (self.i % 4096) * 4096 * 16; self.i += 1
            t, d, out = self.op(f"write {self.wflags} -P 0x{(self.i * 7 + self.seed) % 250 + 1:02x} {off} 4k")
            if self.flush_every and self.i % self.flush_every == 0:
                t2, d2, out2 = self.op("flush"); d = d + d2; out += out2
            m = re.search(r"and ([0-9.]+) ops/sec", out)
            self.log.append((t - T0, d, out, off, 1000.0 / float(m.group(1)) if m else None))
            if d > 0.5 or "ops;" not in out: print(f"[{ts()}] write #{self.i} at {off} started {t-T0:.3f} took {d:.3f}s -> {out.strip()[-120:]!r}", flush=True)
            time.sleep(self.gap)
    def stats(self, t0, t1):
        xs = [x[1]*1000 for x in self.log if t0 <= x[0] < t1]
        return summ(xs) if xs else "none"

    def iolat(self):
        xs = [x[4] for x in self.log if x[4]]
        return summ(xs) if xs else "none"
