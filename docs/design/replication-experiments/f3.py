# generic fault run: python3 f3.py FAULT RECONNECT_DELAY USER_TIMEOUT_MS YANK_AFTER_S
from harness import *
from f2 import mirror_q
fault, rd, uto, yank_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
subprocess.run("ip netns exec rr-b nft delete table inet rrfault 2>/dev/null; ip -n rr-b link set rr-vb up", shell=True)
start_b(); p, q, qio = start_a()
export_a(q)
s1 = mirror_q(q, 1, reconnect_delay=rd, user_timeout_ms=uto or None)
w = ExtWriter(gap=0.1); w.start(); time.sleep(1.5)
t_f = time.monotonic() - T0
print(f"[{ts()}] FAULT {fault}", flush=True)
if fault == "kill": procs['b'].kill()
elif fault == "stop": os.kill(procs['b'].pid, signal.SIGSTOP)
elif fault == "drop": subprocess.run("ip netns exec rr-b nft add table inet rrfault && ip netns exec rr-b nft add chain inet rrfault in '{ type filter hook input priority 0; policy drop; }' && ip netns exec rr-b nft add chain inet rrfault out '{ type filter hook output priority 0; policy drop; }'", shell=True, check=True)
elif fault == "linkdown": subprocess.run("ip -n rr-b link set rr-vb down", shell=True, check=True)
# watch TCP state of our dup of the socket
def tcpinfo(s):
    b = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    import struct
    state, ca, retrans, probes, backoff = b[0], b[1], b[2], b[3], b[4]
    unacked = struct.unpack_from("I", b, 24)[0]; last_data_recv = struct.unpack_from("I", b, 48)[0]; last_ack_recv = struct.unpack_from("I", b, 52)[0]
    return dict(state=state, retrans=retrans, backoff=backoff, unacked=unacked, last_ack_recv_ms=last_ack_recv)
tend = time.monotonic() + yank_after
while time.monotonic() < tend:
    time.sleep(1); print(f"[{ts()}] tcp_info of our dup:", tcpinfo(s1), "writes done:", len(w.log), flush=True)
if yank_after < 900:
    print(f"[{ts()}] yank", flush=True); t_y = time.monotonic() - T0
    q.cmd("yank", {"instances": [{"type": "block-node", "node-name": "peer-nbd1"}]}, oob=True)
time.sleep(2); w.stop = True; time.sleep(0.5)
if yank_after < 900: print("writes in the 2 s after yank:", w.stats(t_y, t_y + 2))
after = [x for x in w.log if x[0] >= t_f - 0.2]
print("first writes at/after fault (start, duration s):", [(round(x[0] - t_f, 3), round(x[1], 3)) for x in after[:4]])
print("max write duration after fault: %.3f s" % max(x[1] for x in after))
print("jobs:", jobs(q))
# cleanup the fault
if fault == "stop": os.kill(procs['b'].pid, signal.SIGCONT)
subprocess.run("ip netns exec rr-b nft delete table inet rrfault 2>/dev/null; ip -n rr-b link set rr-vb up", shell=True)
if fault != "kill": procs['b'].kill(); time.sleep(0.3)
start_b(); before = nstat_b()
s2 = add_peer(q, 2)
q.cmd("x-blockdev-change", {"parent": "peer", "node": "peer-nbd2"}); q.cmd("x-blockdev-change", {"parent": "peer", "child": "children.0"})
q.cmd("blockdev-del", {"node-name": "peer-nbd1"})
q.cmd("block-job-resume", {"device": "repl0"})
for i in range(200):
    j = jobs(q)[0]
    if not j["paused"] and j["offset"] == j["len"]: break
    time.sleep(0.05)
print("after resume:", j, "B received bytes:", nstat_b() - before)
q.cmd("stop"); q.cmd("block-job-cancel", {"device": "repl0"}); q.wait_event("BLOCK_JOB_COMPLETED", 30)
print(subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", D+"/a.img", D+"/b.img"], capture_output=True, text=True).stdout)
stop_all()
