#!/usr/bin/env bash
# Start the local Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672) if they are down.
set -euo pipefail

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

if ! port_open 6379; then
    echo "Redis is down; starting it."
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
        --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi

if ! port_open 5672; then
    echo "RabbitMQ is down; starting it."
    rabbitmq-server -detached
fi

for _ in $(seq 1 120); do
    if port_open 6379 && port_open 5672; then
        exit 0
    fi
    sleep 1
done
echo "Redis or RabbitMQ did not come up within 120 s." >&2
exit 1
