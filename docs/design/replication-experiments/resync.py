# full resync seconds per GiB: A's 1 GiB file all random data, B's file stale; mirror sync=full to B over TCP (namespaces)
from harness import *
from f2 import mirror_q
label = sys.argv[1]
start_b(); p, q, qio = start_a()
b0 = nstat_b(); t = time.monotonic()
mirror_q(q, 1)
el = time.monotonic() - t
print(f"{label}: full sync of 1 GiB (all data) ready in {el:.2f} s; B received {(nstat_b()-b0)/2**20:.0f} MiB; {el:.2f} s/GiB", flush=True)
# dirty bitmap visible in query-block?
print([b.get("dirty-bitmaps") or b.get("inserted", {}).get("dirty-bitmaps") for b in q.cmd("query-block", quiet=True)["return"] if b["device"] == "vol0"])
q.cmd("stop"); q.cmd("block-job-cancel", {"device": "repl0"}); q.wait_event("BLOCK_JOB_COMPLETED", 30)
print(subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", D+"/a.img", D+"/b.img"], capture_output=True, text=True).stdout)
