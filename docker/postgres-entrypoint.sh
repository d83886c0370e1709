#!/bin/sh
# Entry point of the stand-in PostgreSQL image (Dockerfile.postgres): on an empty data folder, create
# the cluster, POSTGRES_USER with POSTGRES_PASSWORD (or the file POSTGRES_PASSWORD_FILE names) and the
# database POSTGRES_DB, as the official image does; then run the server in the foreground, accepting
# password logins from the network.
set -eu
BIN=$(ls -d /usr/lib/postgresql/*/bin | tail -n 1)
SERVER_OPTIONS="-c port=5432 -c unix_socket_directories=/var/run/postgresql"
if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then POSTGRES_PASSWORD=$(cat "$POSTGRES_PASSWORD_FILE"); fi
: "${POSTGRES_USER:=postgres}" "${POSTGRES_DB:=$POSTGRES_USER}"
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    password_file=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$password_file"
    "$BIN/initdb" --pgdata="$PGDATA" --username="$POSTGRES_USER" --pwfile="$password_file" \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$password_file"
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != "postgres" ]; then
        "$BIN/pg_ctl" --pgdata="$PGDATA" --options="$SERVER_OPTIONS -c listen_addresses=''" --wait start >/dev/null
        "$BIN/psql" --host=/var/run/postgresql --port=5432 --username="$POSTGRES_USER" --dbname=postgres --quiet \
            --command="CREATE DATABASE \"$POSTGRES_DB\""
        "$BIN/pg_ctl" --pgdata="$PGDATA" --mode=fast --wait stop >/dev/null
    fi
    echo "=> initialized $PGDATA: user $POSTGRES_USER, database $POSTGRES_DB"
fi
# shellcheck disable=SC2086
exec "$BIN/postgres" -D "$PGDATA" $SERVER_OPTIONS -c listen_addresses='*'
