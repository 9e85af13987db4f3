cd /tmp/repl-research
run() { echo "=== $*"; timeout 200 python3 f3.py "$@" 2>&1 | grep -v "JOB_STATUS\|qmp_capab\|id\": 1}\|getfd\|blockdev-add\|blockdev-mirror\|x-blockdev\|\"return\": {}\|export\|nbd-server\|QUORUM\|BLOCK_JOB_ERROR" | cut -c1-300; }
run kill 300 0 4
run stop 0 0 8
run drop 0 0 20
run drop 300 2000 8
run linkdown 0 0 8
