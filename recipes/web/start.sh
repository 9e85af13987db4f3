# Rendered by vroom-init from the web appliance's config.
exec /bin/busybox httpd -f -p {{ port }} -h /run/www
