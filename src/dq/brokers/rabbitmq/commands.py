"""`COMMANDS`: how each command of `dq.core` is carried out on RabbitMQ."""

from __future__ import annotations

from dq.brokers.steps import Cannot, CommandTable, ServerStep
from dq.core import (
    Ack,
    AckMany,
    DeclareQueue,
    Enqueue,
    ExpireDeadLetters,
    ExpireLeases,
    Flush,
    FlushAll,
    Nack,
    Promote,
    Recover,
    Release,
    Renew,
    Replace,
    Requeue,
    Reserve,
    Start,
)

__all__ = ["COMMANDS"]

#: How each core command is carried out on RabbitMQ: one AMQP sequence each, named
#: after the command, or why RabbitMQ cannot (and what happens instead). The server
#: keeps the queues; dq decides what to publish, ack or nack.
COMMANDS: CommandTable = {
    DeclareQueue: ServerStep(
        "queue.declare q, q.DQ, q.XQ", "idempotent declares with Dramatiq's arguments"
    ),
    Enqueue: ServerStep(
        "basic.publish", "one persistent publish (confirmed with confirm_delivery)"
    ),
    Reserve: ServerStep(
        "basic.qos + basic.consume",
        "the server sends up to prefetch unacked deliveries (a subscription; with "
        "exact_reservations, a consume cancelled once the free room arrived)",
    ),
    Ack: ServerStep("basic.ack", "one ack frame"),
    AckMany: ServerStep("basic.ack multiple", "one ack frame settling every tag up to one"),
    Nack: ServerStep(
        "basic.nack requeue=false",
        "the server dead-letters to q.XQ (x-dead-letter-routing-key) in the same step",
    ),
    Requeue: ServerStep("publish confirmed, then basic.ack", "the copy is stored first"),
    Promote: ServerStep("publish to q confirmed, then basic.ack", "the copy is stored first"),
    Replace: ServerStep(
        "publish to q or q.DQ confirmed, then basic.ack", "the retry is stored first"
    ),
    Start: Cannot(
        "RabbitMQ keeps no per-message run state: it counts no deliveries, so there "
        "is no delivery cap (redelivered messages carry the redelivered flag)"
    ),
    Recover: ServerStep(
        "connection close",
        "the server requeues every unacked delivery of a closed channel itself "
        "(no delivery count: RabbitMQ has no cap)",
    ),
    Renew: Cannot(
        "the server tracks live consumers by their connection, not by leases; its "
        "consumer_timeout plays the lease's role (dq re-leases far delays under it)"
    ),
    ExpireLeases: Cannot(
        "no leases: a consumer holding a delivery past consumer_timeout has its channel "
        "closed by the server, which requeues the delivery"
    ),
    ExpireDeadLetters: Cannot(
        "the x-message-ttl argument of q.XQ makes the server drop old dead letters"
    ),
    Flush: ServerStep("queue.purge q, q.DQ, q.XQ", "unacked deliveries stay with consumers"),
    FlushAll: ServerStep("queue.purge of every declared queue", "one flush per queue"),
    Release: ServerStep(
        "publish each held delivery confirmed, then basic.ack; close",
        "what the consumer held is stored at the tail before it is acked",
    ),
}
