# Fault: B SIGKILLed; target is a quorum(vote-threshold=1) over the NBD node so the connection can be swapped
from harness import *
def mirror_q(q, gen=1, **kw):
    s = add_peer(q, gen, **kw)
    r = q.cmd("blockdev-add", {"driver": "quorum", "node-name": "peer", "vote-threshold": 1, "children": [f"peer-nbd{gen}"]})
    assert "return" in r, r
    t = time.monotonic()
    q.cmd("blockdev-mirror", {"job-id": "repl0", "device": "vol0", "target": "peer", "sync": "full",
          "copy-mode": "write-blocking", "on-target-error": "stop", "on-source-error": "stop", "auto-dismiss": False})
    q.wait_event("BLOCK_JOB_READY", timeout=600)
    print("READY after %.2f s" % (time.monotonic() - t), flush=True)
    return s
if __name__ == "__main__":
    start_b(); p, q, qio = start_a()
    s1 = mirror_q(q, 1)
    w = Writer(qio); w.start(); time.sleep(2)
    print("writes with mirror via quorum:", w.stats(0, 1e9))
    t_kill = time.monotonic() - T0
    print(f"[{ts()}] SIGKILL B", flush=True); procs['b'].kill()
    time.sleep(3); w.stop = True; time.sleep(0.3)
    print("writes 3s after kill:", w.stats(t_kill, t_kill + 3), "count", sum(1 for x in w.log if x[0] >= t_kill))
    print("jobs after kill:", jobs(q))
    start_b(); before = nstat_b()
    s2 = add_peer(q, 2)
    q.cmd("x-blockdev-change", {"parent": "peer", "node": "peer-nbd2"})
    q.cmd("x-blockdev-change", {"parent": "peer", "child": "children.0"})
    q.cmd("blockdev-del", {"node-name": "peer-nbd1"})
    j = jobs(q)[0]; print("jobs before resume:", j, "to resend:", j["len"] - j["offset"])
    t = time.monotonic(); q.cmd("block-job-resume", {"device": "repl0"})
    for i in range(200):
        j = jobs(q)[0]
        if not j["paused"] and j["offset"] == j["len"]: break
        time.sleep(0.05)
    print("after resume %.2fs:" % (time.monotonic() - t), j, "B received bytes:", nstat_b() - before)
    w2 = Writer(qio, base=600<<20); w2.start(); time.sleep(2); w2.stop = True; time.sleep(0.3)
    print("writes after resume:", w2.stats(0, 1e9))
    q.cmd("stop"); q.cmd("block-job-cancel", {"device": "repl0"})
    q.wait_event("BLOCK_JOB_COMPLETED", 30)
    print(subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", D+"/a.img", D+"/b.img"], capture_output=True, text=True).stdout)
    stop_all()
