# Fault 1: B SIGKILLed; on-target-error=stop; B returns; new connection swapped in with blockdev-reopen; resume
from harness import *
subprocess.run(["cp", "--sparse=always", D+"/a.img", D+"/b.img"])  # irrelevant content, mirror is full
start_b(); p, q, qio = start_a()
mirror(q, 1)
w = Writer(qio); w.start(); time.sleep(2)
t_kill = time.monotonic() - T0
pb = [procs['b'].pid]
print(f"[{ts()}] SIGKILL B {pb}", flush=True); [os.kill(int(x), signal.SIGKILL) for x in pb]
time.sleep(3)
print("jobs after kill:", jobs(q))
print("writes 0-2s before kill:", w.stats(t_kill - 2, t_kill)); print("writes 3s after kill:", w.stats(t_kill, t_kill + 3))
w.stop = True; time.sleep(0.3)
n_dirty_writes = sum(1 for (t, d, r) in w.log if t >= t_kill)
print("writes while B down:", n_dirty_writes)
# B returns (same file, kept its data)
start_b(); before = nstat_b()
s2 = add_peer(q, 2)
r = q.cmd("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "peer", "file": "peer-nbd2"}]})
q.cmd("blockdev-del", {"node-name": "peer-nbd1"})
print("jobs before resume:", jobs(q))
t = time.monotonic(); q.cmd("block-job-resume", {"device": "repl0"})
for i in range(100):
    j = jobs(q)[0]
    if j["status"] == "ready" and not j["paused"] and j["offset"] == j["len"]: break
    time.sleep(0.05)
print("after resume %.2fs:" % (time.monotonic() - t), j, "B received bytes:", nstat_b() - before)
w2 = Writer(qio, base=600<<20); w2.start(); time.sleep(2); w2.stop = True; time.sleep(0.3)
print("writes after resume:", w2.stats(0, 1e9))
q.cmd("stop"); r = q.cmd("block-job-cancel", {"device": "repl0"})  # after ready: completes, leaving target consistent
q.wait_event("BLOCK_JOB_COMPLETED", 30)
print(subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", D+"/a.img", D+"/b.img"], capture_output=True, text=True).stdout)
stop_all()
