"""The exact response cache: deterministic requests (greedy, or seeded) answered again without the model.

Key = the model's weights fingerprint + the normalized request. In process by default (an LRU bounded by
entries and bytes); with a redis:// URL it is shared by every replica that points at the same server.
Redis bounds its own memory (run it with maxmemory and `allkeys-lru`); entries also expire after a TTL.
Both are async: the Redis client (redis.asyncio) never blocks the event loop that steps the engine, and
the server treats any cache error as a miss (a cache is an optimization, never a reason to fail).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any, Protocol

import torch

from trainfer.errors import TrainferError


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, dtype and bytes: the identity of the weights, not of a path."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(fingerprint: str, endpoint: str, request: dict[str, Any]) -> str:
    body = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{fingerprint}\n{endpoint}\n{body}".encode()).hexdigest()


class ResponseCache(Protocol):
    async def get(self, key: str) -> dict[str, Any] | None: ...
    async def put(self, key: str, value: dict[str, Any]) -> None: ...


class MemoryCache:
    def __init__(self, max_entries: int = 1024, max_bytes: int = 64 << 20) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.entries: OrderedDict[str, bytes] = OrderedDict()
        self.nbytes = 0

    async def get(self, key: str) -> dict[str, Any] | None:
        raw = self.entries.get(key)
        if raw is None:
            return None
        self.entries.move_to_end(key)
        return json.loads(raw)

    async def put(self, key: str, value: dict[str, Any]) -> None:
        raw = json.dumps(value).encode()
        if len(raw) > self.max_bytes:
            return
        if key in self.entries:
            self.nbytes -= len(self.entries.pop(key))
        self.entries[key] = raw
        self.nbytes += len(raw)
        while len(self.entries) > self.max_entries or self.nbytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= len(old)


class RedisCache:
    def __init__(self, url: str, ttl_s: int = 86400, prefix: str = "trainfer:response:") -> None:
        import redis
        import redis.asyncio

        try:  # check the URL and the server once at start-up, synchronously: a typo fails `trainfer serve`
            with redis.Redis.from_url(url, socket_timeout=2) as probe:
                probe.ping()
            self.client = redis.asyncio.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        except (redis.RedisError, ValueError) as e:
            raise TrainferError(f"cannot use the response cache at {url}: {e}") from None
        self.ttl_s, self.prefix = ttl_s, prefix

    async def get(self, key: str) -> dict[str, Any] | None:
        raw = await self.client.get(self.prefix + key)
        return json.loads(raw) if raw else None

    async def put(self, key: str, value: dict[str, Any]) -> None:
        await self.client.set(self.prefix + key, json.dumps(value), ex=self.ttl_s)
