# Rendered by vroom-init from the sniffer's config; edit with `vroom config`.
# The ring lives in RAM (tmpfs): at most {{ files }} x {{ file_mb }} MB.
exec /usr/bin/tcpdump -i {{ nics['mirror-sink'].dev }} -n -U -Z root \
    -s {{ snaplen }} -C {{ file_mb }} -W {{ files }} \
    -w /var/capture/capture.pcap{% if filter %} {{ filter | shell }}{% endif %}
