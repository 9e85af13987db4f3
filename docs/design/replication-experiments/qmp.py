import socket, json, time, sys, os, threading
T0 = time.monotonic()
def ts(): return "%8.3f" % (time.monotonic() - T0)
class QMP:
    def __init__(self, path, oob=False, name="A", log=None):
        self.name = name; self.log = log or sys.stdout
        for _ in range(200):
            try:
                self.s = socket.socket(socket.AF_UNIX); self.s.connect(path); break
            except OSError: time.sleep(0.05)
        self.f = self.s.makefile("rwb", buffering=0)
        self.events = []; self.lock = threading.Lock(); self.replies = {}; self.cv = threading.Condition()
        greet = json.loads(self.f.readline())
        self.n = 0
        threading.Thread(target=self._reader, daemon=True).start()
        self.cmd("qmp_capabilities", {"enable": ["oob"]} if oob else {})
    def _reader(self):
        for line in self.f:
            m = json.loads(line)
            if "event" in m:
                m["_t"] = ts(); self.events.append(m)
                print(f"[{ts()}] {self.name} EVENT {m['event']} {json.dumps(m.get('data'))}", file=self.log, flush=True)
            else:
                with self.cv:
                    self.replies[m.get("id")] = m; self.cv.notify_all()
    def send(self, name, args=None, oob=False, quiet=False):
        self.n += 1; i = self.n
        msg = {("exec-oob" if oob else "execute"): name, "id": i}
        if args is not None: msg["arguments"] = args
        if not quiet: print(f"[{ts()}] {self.name} -> {json.dumps({k:v for k,v in msg.items() if k!='id'})}", file=self.log, flush=True)
        self.f.write((json.dumps(msg) + "\n").encode())
        return i
    def wait(self, i, timeout=None, quiet=False):
        with self.cv:
            ok = self.cv.wait_for(lambda: i in self.replies, timeout)
            if not ok: return None
            r = self.replies.pop(i)
        if not quiet: print(f"[{ts()}] {self.name} <- {json.dumps(r)[:600]}", file=self.log, flush=True)
        return r
    def cmd(self, name, args=None, oob=False, timeout=None, quiet=False):
        return self.wait(self.send(name, args, oob, quiet), timeout, quiet)
    def hmp(self, line, quiet=False, timeout=None):
        r = self.cmd("human-monitor-command", {"command-line": line}, quiet=quiet, timeout=timeout)
        return r
    def wait_event(self, name, timeout=60, start=0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in self.events[start:]:
                if e["event"] == name: return e
            time.sleep(0.01)
        return None

def getfd(q, name, fd):
    """QMP getfd with the fd passed by SCM_RIGHTS on the monitor socket."""
    q.n += 1; i = q.n
    msg = json.dumps({"execute": "getfd", "arguments": {"fdname": name}, "id": i}) + "\n"
    print(f"[{ts()}] {q.name} -> getfd {name} (SCM_RIGHTS fd {fd})", file=q.log, flush=True)
    socket.send_fds(q.s, [msg.encode()], [fd])
    return q.wait(i)
