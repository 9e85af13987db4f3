from harness import *
os.environ["NBD_EXTRA"] = ",tls-creds=tls0"
start_b(extra=["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={D}/tls/srv,verify-peer=on"])
p, q, qio = start_a()
r = q.cmd("object-add", {"qom-type": "tls-creds-x509", "id": "tlsA", "endpoint": "client", "dir": D + "/tls/cli", "verify-peer": True})
def try_add(gen, extra):
    s = connect(q, f"nbd{gen}")
    return q.cmd("blockdev-add", {"driver": "nbd", "node-name": f"peer-nbd{gen}", "server": {"type": "fd", "str": f"nbd{gen}"}, "export": "vol0", **extra})
try_add(1, {})                                   # plain client against a TLS-only server: must be refused
try_add(2, {"tls-creds": "tlsA"})                # no hostname to check (fd address)
try_add(3, {"tls-creds": "tlsA", "tls-hostname": "n2"})   # the peer's node name, in its certificate's SANs
try_add(4, {"tls-creds": "tlsA", "tls-hostname": "n3"})   # a name not in the certificate
b0 = nstat_b()
q.cmd("blockdev-add", {"driver": "quorum", "node-name": "peer", "vote-threshold": 1, "children": ["peer-nbd3"]})
q.cmd("blockdev-mirror", {"job-id": "repl0", "device": "vol0", "target": "peer", "sync": "full", "copy-mode": "write-blocking", "on-target-error": "stop", "auto-dismiss": False})
t = time.monotonic(); q.wait_event("BLOCK_JOB_READY", 300); print("TLS full sync 1 GiB: %.2f s" % (time.monotonic() - t))
print("dirty-bitmaps:", [b["inserted"].get("dirty-bitmaps") for b in q.cmd("query-block", quiet=True)["return"] if b["device"] == "vol0"])
q.cmd("stop"); q.cmd("block-job-cancel", {"device": "repl0"}); q.wait_event("BLOCK_JOB_COMPLETED", 30)
print(subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", D+"/a.img", D+"/b.img"], capture_output=True, text=True).stdout)
