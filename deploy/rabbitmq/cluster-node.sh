#!/bin/sh
# Runs a command of the compose `cluster` profile (a RabbitMQ node or its CLI tools) with the
# cluster's shared Erlang cookie, taken from the compose secret, then hands over to the image's
# own entrypoint. Nodes only cluster, and CLI tools only reach them, when all share the cookie.
#
#   sh cluster-node.sh rabbitmq-server
set -eu
secret="${CONVEYOR_COOKIE_SECRET:-/run/secrets/rabbitmq_erlang_cookie}"
data_dir="${CONVEYOR_RABBITMQ_HOME:-/var/lib/rabbitmq}"

if [ ! -s "$secret" ]; then
    echo "refusing to start: set RABBITMQ_ERLANG_COOKIE_FILE in .env to a file holding the cluster's shared Erlang cookie" >&2
    exit 1
fi
# The node reads the cookie from its data directory, a CLI tool run as root from $HOME.
# Erlang refuses a cookie file that anyone but its owner can read.
for target in "$data_dir/.erlang.cookie" "${HOME:-$data_dir}/.erlang.cookie"; do
    mkdir -p "$(dirname "$target")"
    rm -f "$target"
    tr -d '\n' < "$secret" > "$target"
    chmod 0400 "$target"
done
if [ "$(id -u)" = 0 ] && id rabbitmq > /dev/null 2>&1; then
    chown rabbitmq:rabbitmq "$data_dir/.erlang.cookie"
fi
exec docker-entrypoint.sh "$@"
