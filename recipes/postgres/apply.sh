# The accounts oneshot, at boot and after every config change: waits for
# the server, creates and updates databases and users (accounts.sql), then
# reloads pg_hba.conf, or restarts the server when a setting that needs it
# changed. Never prints a password: psql's output is kept out of the log but
# for its terse ERROR lines. Run by busybox sh.
umask 077
BIN=/usr/lib/postgresql/15/bin
PGDATA=/var/lib/postgresql/15/main
as_postgres() { busybox su -s /bin/sh postgres -c "$1"; }

until as_postgres "$BIN/pg_isready -q -h /run/postgresql"; do
    sleep 0.3
done

# The SQL holds the passwords: root's alone, handed to psql on its stdin.
chmod 0600 /run/postgres/accounts.sql
out=/run/postgres/apply.out
if ! as_postgres "$BIN/psql -X -q -h /run/postgresql -d postgres -f -" \
    </run/postgres/accounts.sql >"$out" 2>&1; then
    echo "accounts: applying the config failed:"
    grep -o 'ERROR: .*' "$out" | head -5
    rm -f "$out"
    exit 1
fi
rm -f "$out"

# Settings only a restart changes: compared with what the server runs.
want=$(grep -E '^(listen_addresses|max_connections|shared_buffers) ' /run/postgres/postgresql.conf \
    | sed -e "s/ *= */=/" -e "s/'//g" -e 's/MB$//')
have=$(as_postgres "$BIN/psql -X -A -t -h /run/postgresql -d postgres -c \"
    SELECT 'listen_addresses=' || current_setting('listen_addresses')
    UNION ALL SELECT 'max_connections=' || current_setting('max_connections')
    UNION ALL SELECT 'shared_buffers=' || (setting::bigint * 8 / 1024) FROM pg_settings WHERE name = 'shared_buffers'\"")
if [ "$(echo "$want" | sort)" != "$(echo "$have" | sort)" ]; then
    echo "accounts: restarting postgres for new settings"
    # A fast shutdown; vroom-init starts the service again.
    kill -INT "$(head -1 "$PGDATA/postmaster.pid")"
else
    as_postgres "$BIN/psql -X -q -A -t -h /run/postgresql -d postgres -c 'SELECT pg_reload_conf()'" >/dev/null
fi
echo "accounts: config applied"
