# Rendered by vroom-init: br0 joins outside and inside. Idempotent.
set -e
[ -d /sys/class/net/br0 ] || /bin/busybox brctl addbr br0
for port in {{ nics.outside.dev }} {{ nics.inside.dev }}; do
    [ -e /sys/class/net/br0/brif/$port ] || /bin/busybox brctl addif br0 $port
    /bin/busybox ip link set $port up
done
# No spanning tree (the default), so ports forward at once.
echo 0 > /sys/class/net/br0/bridge/stp_state
/bin/busybox ip link set br0 up
