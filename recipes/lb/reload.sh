# After a config change (and once at boot): the HAProxy master re-reads the
# new file and starts new workers; connections in flight finish on the old
# ones. Returns once a new worker runs, so a `config set` that returns has
# its backends in force.
pid=$(cat /run/lb/haproxy.pid 2>/dev/null) || exit 0
[ -d "/proc/$pid" ] || exit 0
newest_worker() {
    for stat in /proc/[0-9]*/stat; do
        read -r p _ _ ppid _ <"$stat" 2>/dev/null && [ "$ppid" = "$pid" ] && echo "$p"
    done | sort -n | tail -1
}
before=$(newest_worker)
kill -USR2 "$pid" || exit 0
i=0
while [ "$i" -lt 100 ]; do
    now=$(newest_worker)
    if [ -n "$now" ] && [ "$now" != "$before" ]; then
        exit 0
    fi
    sleep 0.05
    i=$((i + 1))
done
echo "reload: no new HAProxy worker after 5 s"
exit 1
