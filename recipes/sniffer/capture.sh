# Rendered by vroom-init from the sniffer's config; edit with `vroom config`.
# The ring lives in RAM (tmpfs): at most {{ files }} x {{ file_mb }} MB.
{% if nics.outside and nics.inside %}
# Inline: outside and inside are the ports of br0; tcpdump captures on br0
# what crosses it, both ways.
set -e
[ -d /sys/class/net/br0 ] || /bin/busybox brctl addbr br0
for port in {{ nics.outside.dev }} {{ nics.inside.dev }}; do
    [ -e /sys/class/net/br0/brif/$port ] || /bin/busybox brctl addif br0 $port
    /bin/busybox ip link set $port up
done
echo 0 > /sys/class/net/br0/bridge/stp_state
/bin/busybox ip link set br0 up
exec /usr/bin/tcpdump -i br0 -n -U -Z root \
{% else %}
# Fed by a mirror: capture what reaches the sink.
exec /usr/bin/tcpdump -i {{ nics['mirror-sink'].dev }} -n -U -Z root \
{% endif %}
    -s {{ snaplen }} -C {{ file_mb }} -W {{ files }} \
    -w /captures/capture.pcap{% if filter %} {{ filter | shell }}{% endif %}
