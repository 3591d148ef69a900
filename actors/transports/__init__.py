"""The transports a reload source can travel by, tried in order.

Built in: ``trainer_stream`` (a ``TrainerSource``: the trainer's Ray actors send each engine
rank its pieces), ``files`` (a checkpoint directory every rank reads itself) and
``shared_memory`` (a dict or iterable of tensors: through shared memory tp-reload keeps on
the node when the driver and the ranks share it, through Ray's object store otherwise). Any other is
a ``Transport`` registered from outside the package with ``register_transport``; it is tried
before the built-in ones, and nothing in the orchestrator changes.
"""

from __future__ import annotations

from typing import Any

from actors.transports.base import (
    BucketMessage,
    BucketReader,
    BucketTransport,
    Delivery,
    DeliveryContext,
    LinkMessage,
    Source,
    TensorInfo,
    Transport,
)
from orchestrator.errors import CheckpointError

_registered: list[Transport] = []


def register_transport(transport: Transport) -> Transport:
    """Offer ``transport`` every reload source before the built-in transports."""
    _registered[:] = [t for t in _registered if t.name != transport.name]
    _registered.insert(0, transport)
    return transport


def transports() -> list[Transport]:
    from actors.transports.files import FilesTransport
    from actors.transports.shared_memory import SharedMemoryTransport
    from actors.transports.trainer_stream import TrainerStreamTransport

    if not any(isinstance(t, FilesTransport) for t in _registered):
        _registered.extend([TrainerStreamTransport(), FilesTransport(), SharedMemoryTransport()])
    return list(_registered)


def open_source(source: Any, timeout_s: float = 60.0) -> Source:
    """List ``source`` with the first transport that accepts it."""
    if isinstance(source, Source):
        return source
    for transport in transports():
        if transport.accepts(source):
            return transport.open(source, timeout_s)
    names = ", ".join(t.name for t in transports())
    raise CheckpointError(f"unsupported reload source {type(source).__name__}: pass a "
                          "checkpoint directory, a dict name -> tensor, (name, tensor) pairs "
                          f"or a TrainerSource (transports: {names})")


__all__ = ["BucketMessage", "BucketReader", "BucketTransport", "Delivery", "DeliveryContext",
           "LinkMessage", "Source", "TensorInfo", "Transport", "open_source",
           "register_transport", "transports"]
