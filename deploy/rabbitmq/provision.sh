#!/usr/bin/env bash
# Provision an existing RabbitMQ broker for Conveyor: vhost, role users, permissions and
# topology, from the same definitions compose loads at boot. Idempotent: users' passwords
# and permissions are updated, existing queues are left as they are.
#
#   CONVEYOR_ADMIN_PASSWORD=... CONVEYOR_PRODUCER_PASSWORD=... CONVEYOR_WORKER_PASSWORD=... \
#   CONVEYOR_MONITOR_PASSWORD=... CONVEYOR_EXPORTER_PASSWORD=... deploy/rabbitmq/provision.sh [rabbitmqctl arguments, e.g. -n rabbit@host]
#
# Each password may be given as NAME_FILE=path instead. Set DELETE_GUEST=1 to remove guest.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
rabbitmqctl="${RABBITMQCTL:-rabbitmqctl}"
python="${PYTHON:-python3}"

file="$(mktemp)"
trap 'rm -f "$file"' EXIT
"$python" "$here/definitions.py" > "$file"
"$rabbitmqctl" "$@" import_definitions "$file"
if [ "${DELETE_GUEST:-0}" = "1" ]; then
    "$rabbitmqctl" "$@" delete_user guest || true
fi
