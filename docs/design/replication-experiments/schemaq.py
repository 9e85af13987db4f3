import json, sys
s = json.load(open(sys.argv[1])); by = {e["name"]: e for e in s}
def show(name, depth=0):
    e = by[name]
    if e["meta-type"] == "command":
        print("command", sys.argv[2], "args:"); show(e["arg-type"], 1); return
    if e["meta-type"] == "object":
        for m in e["members"]:
            t = by[m["type"]]; tn = t.get("meta-type")
            extra = ""
            if tn == "enum": extra = str(t.get("values"))
            print("  "*depth + m["name"], "(opt)" if "default" in m else "", tn, extra, t.get("name") if tn=="object" else "")
        for v in e.get("variants", []): print("  "*depth, "variant", v["case"], "->", v["type"])
    else: print(e)
# find command
for e in s:
    if e["meta-type"] == "command" and e["name"] == sys.argv[2]:
        show(e["arg-type"]); print("allow-oob", e.get("allow-oob"))
