import sys, json; sys.path.insert(0, "/tmp/repl-research"); from qmp import QMP
q = QMP(sys.argv[1], quiet:=None) if False else QMP(sys.argv[1])
r = q.cmd("query-qmp-schema", quiet=True)["return"]
json.dump(r, open(sys.argv[2], "w"))
