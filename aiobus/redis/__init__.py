"""aiobus over Redis: buses bridged across hosts, fleet operations, and brokers served from a Stream.

An optional extra: ``pip install aiobus[redis]`` brings coredis (a Redis client built on anyio, so
all of this runs on asyncio and trio alike). The core of aiobus does not import this package.

Layers: ``_connect`` (URLs, connecting, credentials kept out of logs, backoff) is shared; the
bridge and fleet operations, and the brokers on a Stream (``_envelope``, the JSON on the wire;
``streams``, the senders; ``streams_broker``, the brokers; ``streams_link``, their functions' link),
are built on it and on aiobus's public API.
"""

from ._connect import Backoff as Backoff
from ._connect import RedisUnavailable as RedisUnavailable
from ._connect import connect as connect
from ._connect import redact as redact
from ._ledger import BridgeStatistics as BridgeStatistics
from ._wire import Envelope as Envelope
from .bridge import RedisBridge as RedisBridge
from .bridge import current_envelope as current_envelope
from .fleet import Fleet as Fleet
from .fleet import FleetResult as FleetResult
from .fleet import Presence as Presence
from .streams import RemoteBroker as RemoteBroker
from .streams import RemoteBrokerStatistics as RemoteBrokerStatistics
from .streams_broker import StreamBroker as StreamBroker
from .streams_broker import StreamBrokerStatistics as StreamBrokerStatistics
from .streams_link import StreamLink as StreamLink

__all__ = [
    "Backoff",
    "BridgeStatistics",
    "Envelope",
    "Fleet",
    "FleetResult",
    "Presence",
    "RedisBridge",
    "RedisUnavailable",
    "RemoteBroker",
    "RemoteBrokerStatistics",
    "StreamBroker",
    "StreamBrokerStatistics",
    "StreamLink",
    "connect",
    "current_envelope",
    "redact",
]
