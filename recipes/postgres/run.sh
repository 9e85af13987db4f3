# The postgres service: creates the cluster on first boot (an empty data
# volume), then runs the server as the postgres user. Run by busybox sh.
set -e
BIN=/usr/lib/postgresql/15/bin
BASE=/var/lib/postgresql
PGDATA=$BASE/15/main

mkdir -p /run/postgresql "$BASE/15"
# Debian's clients look for the socket in /var/run/postgresql (`vroom exec
# pg -- psql -U postgres`); /var is a fresh tmpfs.
[ -e /var/run ] || ln -s /run /var/run
chown postgres:postgres /run/postgresql "$BASE" "$BASE/15"
chmod 2775 /run/postgresql

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    echo "postgres: creating the cluster in $PGDATA"
    # Built beside its final place and renamed: a boot cut short leaves no
    # half-made cluster. -N and one sync: initdb's own fsyncs are slow under
    # emulation, the sync gives the same guarantee.
    rm -rf "$PGDATA.new"
    mkdir -m 0700 "$PGDATA.new"
    chown postgres:postgres "$PGDATA.new"
    # Its output only on failure: it warns that it finds no system locales
    # (the cluster uses the C locale, on purpose).
    if ! busybox su -s /bin/sh postgres -c "$BIN/initdb -D $PGDATA.new -N --no-instructions \
        --no-locale -E UTF8 --auth-local=peer --auth-host=scram-sha-256" >/run/initdb.log 2>&1; then
        cat /run/initdb.log
        exit 1
    fi
    sync
    mv "$PGDATA.new" "$PGDATA"
    sync
    echo "postgres: cluster created"
fi

exec busybox su -s /bin/sh postgres -c \
    "exec $BIN/postgres -D $PGDATA -c config_file=/run/postgres/postgresql.conf"
