#!/usr/bin/env bash
# Start the local Redis (127.0.0.1:6379), RabbitMQ (127.0.0.1:5672) and Memcached
# (127.0.0.1:11211, for the results and rate-limiter backends' tests) if they are down.
# Memcached is installed from Debian's packages when it is missing.
#
#   bash scripts/services.sh                  # all three
#   bash scripts/services.sh redis memcached  # only those named
set -euo pipefail

wanted=("$@")
if [ ${#wanted[@]} -eq 0 ]; then
    wanted=(redis rabbitmq memcached)
fi
want() {
    [[ " ${wanted[*]} " == *" $1 "* ]]
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

if want redis && ! port_open 6379; then
    echo "Redis is down; starting it."
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
        --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi

if want rabbitmq && ! port_open 5672; then
    echo "RabbitMQ is down; starting it."
    rabbitmq-server -detached
fi

if want memcached && ! port_open 11211; then
    if ! command -v memcached >/dev/null; then
        echo "Memcached is not installed; installing it (apt-get install memcached)."
        apt-get install -y -q memcached >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q memcached >/dev/null; }
    fi
    echo "Memcached is down; starting it."
    memcached -d -u "$(id -un)" -l 127.0.0.1 -p 11211 -m 64
fi

for _ in $(seq 1 120); do
    if { ! want redis || port_open 6379; } && { ! want rabbitmq || port_open 5672; } &&
        { ! want memcached || port_open 11211; }; then
        exit 0
    fi
    sleep 1
done
echo "${wanted[*]}: not all came up within 120 s." >&2
exit 1
