"""The lanes workers consume, in priority order, and how many messages wait in each.

Web requests go to `interactive`, corpus jobs to `bulk`; workers poll `interactive` first. kombu's
Redis transport keeps a queue as one list per priority step (`bulk`, `bulk\\x06\\x163`, ...), under
embedq's key prefix (Celery's `global_keyprefix`): the depth of a queue is the sum of its lists.
"""

from __future__ import annotations

import redis
import redis.asyncio as aredis

from workers.protocol.keys import Keys

INTERACTIVE = "interactive"
BULK = "bulk"
#: In priority order: a worker polls `interactive` before `bulk`.
QUEUES = (INTERACTIVE, BULK)
#: kombu's Redis transport (kombu.transport.redis): the priority steps it keeps a list for, and the
#: separator in those lists' names; tests/test_protocol.py checks both against kombu itself.
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = "\x06\x16"


def queue_lists(keys: Keys, queue: str) -> list[str]:
    """The Redis lists that hold the messages of `queue`, one per priority step."""
    return [keys.queue(queue if not step else f"{queue}{PRIORITY_SEP}{step}") for step in PRIORITY_STEPS]


def queue_depth(client: redis.Redis, keys: Keys, queue: str) -> int:
    """Messages waiting in `queue` (all its priority lists), in one round trip."""
    with client.pipeline(transaction=False) as pipe:
        for name in queue_lists(keys, queue):
            pipe.llen(name)
        return int(sum(pipe.execute()))


async def queue_depth_async(client: aredis.Redis, keys: Keys, queue: str) -> int:
    """`queue_depth` on redis.asyncio, for the asyncio client and the gateway."""
    async with client.pipeline(transaction=False) as pipe:
        for name in queue_lists(keys, queue):
            pipe.llen(name)
        return int(sum(await pipe.execute()))
