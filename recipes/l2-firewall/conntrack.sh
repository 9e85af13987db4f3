# Rendered by vroom-init: sizes the connection tracking table. The kernel's
# default for a guest this small is 1,024 entries, which ordinary load fills
# (20 new connections a second, each kept 120 s in TIME_WAIT): then every
# new connection is dropped. conntrack_max=0 sizes it for the guest's memory:
# one entry (about 320 bytes in the kernel) per 4 KiB, about 8% of it when
# full. A value set by hand is capped at one entry per KiB.
set -e
mem_kib=$(/bin/busybox awk '/^MemTotal:/ { print $2 }' /proc/meminfo)
max={{ conntrack_max }}
[ "$max" -gt 0 ] || max=$((mem_kib / 4))
[ "$max" -le "$mem_kib" ] || max=$mem_kib
[ "$max" -ge 1024 ] || max=1024
# A bucket per entry, as the kernel's own default: two hash entries per
# bucket when full (each connection is hashed once per direction).
buckets=$max
echo $buckets > /proc/sys/net/netfilter/nf_conntrack_buckets 2>/dev/null ||
    echo $buckets > /sys/module/nf_conntrack/parameters/hashsize 2>/dev/null ||
    echo "connection tracking: the hash stays at $(cat /proc/sys/net/netfilter/nf_conntrack_buckets) buckets"
echo $max > /proc/sys/net/netfilter/nf_conntrack_max
echo "connection tracking: at most $max entries"
