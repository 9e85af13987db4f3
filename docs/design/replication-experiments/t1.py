import sys, json; sys.path.insert(0, "/tmp/repl-research"); from qmp import *
q = QMP("/tmp/repl-research/a.sock")
r = q.cmd("query-named-block-nodes", {"flat": True}, quiet=True)
for n in r["return"]: print(n["node-name"], n["drv"], n["file"])
r = q.cmd("query-block", quiet=True)
for b in r["return"]: print("BB", b["device"], b.get("qdev"), b["inserted"]["node-name"] if "inserted" in b else None)
