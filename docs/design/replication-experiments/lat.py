# latency: 'guest' = qemu-io over NBD unix to A's export; latency from qemu-io's own ops/sec (submit->complete)
from harness import *
from f2 import mirror_q
wt = sys.argv[1] if len(sys.argv) > 1 else "on"
start_b(extra=[] if wt == "on" else []); p, q, qio = start_a(); export_a(q)
def run(label, **kw):
    w = ExtWriter(gap=0.01, **kw); w.start(); time.sleep(6); w.stop = True; time.sleep(0.3)
    print(f"{label}: io {w.iolat()} | round trip {w.stats(0, 1e9)}", flush=True)
run("no mirror, write"); run("no mirror, write FUA (=write+fdatasync on A)", wflags="-f")
s1 = mirror_q(q, 1)
run(f"sync mirror B writethrough={wt}, write"); run(f"sync mirror B writethrough={wt}, write FUA", wflags="-f")
