"""The transport interface: how a source's tensors reach the engine ranks.

A transport has a driver side and a rank side, in one module each:
  * driver: ``accepts`` a user's reload argument, ``open``s it into a ``Source`` (names,
    shapes, dtypes: no data), and ``send``s each bucket of the plan as a ``BucketMessage``
    (or, for a transport that needs the whole plan, ``deliver``s them all). What the commit
    log keeps to replay the source is the messages sent, the source's files'
    ``fingerprints``, and what the ranks keep (``Delivery.rank_kept``);
  * rank: ``BucketMessage.read`` turns a message into ``(name, weight)`` pairs, through the
    rank's ``BucketReader`` (one per reload: open files, a stream's group, fetch timing).
The registry (``actors.transports``) picks the first transport that accepts a source.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from actors.dtypes import SAFETENSORS_DTYPES
from actors.lazy import LazyWindow, TensorEntry

if TYPE_CHECKING:
    from actors.reload import Routing
    from orchestrator.fleet import Fleet
    from orchestrator.plan import Bucket, Plan

Fingerprint = tuple[int, int]
"""A checkpoint file's (size, mtime_ns) when it was listed."""
Items = list[tuple[str, LazyWindow]]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    """safetensors dtype code, e.g. ``BF16``."""
    nbytes: int
    file: str | None
    """Absolute path of the file holding the tensor; None when it is not in a file."""
    offset: int = 0
    """Where its bytes start in ``file``."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]


@dataclass(frozen=True, slots=True)
class Source:
    """A reload source, listed but not read, with the transport that carries it."""

    transport: Transport
    tensors: tuple[TensorInfo, ...]
    """In the source's own order (files in index order, tensors by position in the file)."""
    description: str
    handle: Any = None
    """What the transport needs to send it later (in-memory tensors, a listed trainer)."""

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


# ---- rank side ---------------------------------------------------------------------------

class BucketMessage(ABC):
    """One bucket as a rank receives it. Frozen dataclasses in practice (they are pickled
    to every rank and kept by the commit log)."""

    entries: tuple[TensorEntry, ...]
    """The bucket's tensors in stream order: a rank that already failed keeps count of the
    bucket with their shapes, without reading a byte."""
    must_read: ClassVar[bool] = False
    """Read even after this rank failed: a peer process blocks until the bytes are taken
    (a trainer's sends)."""

    @abstractmethod
    def read(self, reader: BucketReader) -> Items:
        """The bucket's tensors as lazily read windows."""


class ReleasedInBackground(dict):
    """Reader state that ``BucketReader.close`` lets go on a thread of its own, after the
    reload's reply: mapped files, whose unmapping (~1-3 ms for the half GB of pages a 0.5B
    model's rank touched here) the driver need not wait for. Python unmaps with the GIL
    released, so the rank's next call runs meanwhile."""


class BucketReader:
    """Rank side, one per reload: reads bucket messages, keeping what they open (mapped
    files, a stream's group) in ``state`` until ``close``."""

    def __init__(self, kept: dict[int, Any] | None = None,
                 device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.fetch_seconds = 0.0
        """Time spent waiting for bytes to arrive (object store fetches, stream receives)."""
        self.state: dict[str, Any] = {}
        """Per transport, what its messages share during this reload (mapped files)."""
        self.kept = {} if kept is None else kept
        """What the rank keeps across reloads for replay, by id (trainer streams)."""
        self.to_keep: tuple[int, Any] | None = None
        """What this reload asks the rank to keep once it commits."""

    def items(self, bucket: BucketMessage) -> Items:
        return bucket.read(self)

    def timed(self, fetch: Callable[[], Any]) -> Any:
        """``fetch()``, its seconds counted as transfer time."""
        begin = time.perf_counter()
        try:
            return fetch()
        finally:
            self.fetch_seconds += time.perf_counter() - begin

    def close(self) -> None:
        state, self.state = self.state, {}
        later = [state.pop(k) for k, v in list(state.items())
                 if isinstance(v, ReleasedInBackground)]
        state.clear()
        if later:  # the thread holds the last references
            threading.Thread(target=later.clear, name="reader-release", daemon=True).start()


class LinkMessage(ABC):
    """Sent to every rank before a reload's buckets by transports that connect the ranks to
    a peer (a trainer): ``open`` joins it."""

    @abstractmethod
    def open(self, reader: BucketReader) -> None: ...


# ---- driver side -------------------------------------------------------------------------

RankCalls = dict[tuple[int, int], Any]
"""(engine, rank) -> pending Ray call."""


@dataclass(slots=True)
class Delivery:
    """A source on its way: the rank calls of each step and what replays it."""

    steps: Iterator[tuple[RankCalls, int | None]]
    """Per step (a bucket, or a link): every rank's call and the bucket's source bytes (None
    for a step that is no bucket: a link); produced lazily, so a transport that holds
    memory per step is throttled."""
    replay: list[BucketMessage] = field(default_factory=list)
    """Messages that rebuild this source on every rank (filled as steps are produced)."""
    rank_kept: int | None = None
    """Id of what each rank keeps to replay it (``BucketReader.to_keep``), if anything."""
    finish: Callable[[float], list[int]] = lambda timeout_s: []
    """After every rank finished: wait for the sending side; bytes each sender sent."""
    blame: Callable[[BaseException, float], BaseException] = lambda error, timeout_s: error
    """After a failure: the error to report (a failed sender rather than its receivers)."""
    carrier: str = ""
    """How the bytes travel, when a transport picks between ways (``shared_memory``,
    ``object_store``); empty: the transport's name."""
    node_bytes: int = 0
    """Bytes the replay messages keep alive in a node's shared memory (the object store, or
    tp-reload's own regions): what the commit log costs while it holds this source."""
    max_in_flight: int | None = None
    """Steps pending at once when it is not the transport's ``max_in_flight`` (a transport
    that picks between carriers: only one of them holds memory per step); None: the
    transport's."""
    messages: tuple[BucketMessage, ...] | None = None
    """A ``one_call`` transport's messages, all of them, in order."""

    def drop(self) -> None:
        """After a failure: let go of the messages and the steps not yet produced, and so of
        what they hold (a region's lease), while the failure's frames may live on in an
        error the caller keeps."""
        self.replay.clear()
        close = getattr(self.steps, "close", None)
        if close is not None:
            close()
        self.steps = iter(())


class TransportState:
    """What transports keep for one orchestrator between reloads (regions they reuse, what
    they learned of the fleet), by transport name; closed, last made first, when the
    orchestrator shuts down."""

    def __init__(self) -> None:
        self.kept: dict[str, Any] = {}

    def get(self, name: str, make: Callable[[], Any]) -> Any:
        """``name``'s state, made by ``make()`` the first time (anything with ``close()``)."""
        if name not in self.kept:
            self.kept[name] = make()
        return self.kept[name]

    def close(self) -> None:
        while self.kept:
            _, state = self.kept.popitem()
            state.close()


@dataclass(frozen=True, slots=True)
class DeliveryContext:
    """What a transport that needs the whole plan may use to deliver it."""

    fleet: Fleet
    routing: Routing
    device: str
    """The engines' device (``cpu``/``cuda``)."""
    timeout_s: float
    state: TransportState = field(default_factory=TransportState)
    """The orchestrator's transport state (kept across its reloads)."""
    shared_memory: bool = True
    """``EngineConfig.shared_memory``."""


class Transport(ABC):
    """One way bytes reach the ranks (see the module doc)."""

    name: ClassVar[str]
    max_in_flight: ClassVar[int | None] = None
    """Steps pending at once; None: every step is queued at once (nothing is held per
    step). Bounded for transports whose steps hold memory until the ranks read them."""
    one_call: ClassVar[bool] = False
    """Its messages name what the ranks read and hold nothing, and need no link: ``deliver``
    makes them all at once (``Delivery.messages``; its steps, made only if taken, carry the
    same messages a call each), and each rank gets them in
    one call that also starts and finishes the reload (``RankActor.reload_all``): two Ray
    round trips fewer per rank than start, a step per message, finish."""

    @abstractmethod
    def accepts(self, source: Any) -> bool:
        """Whether ``source`` (a ``reload`` argument) is this transport's to carry."""

    @abstractmethod
    def open(self, source: Any, timeout_s: float) -> Source:
        """List ``source``; CheckpointError names what is wrong with it."""

    @abstractmethod
    def deliver(self, source: Source, plan: Plan, context: DeliveryContext) -> Delivery:
        """Queue the plan on every rank of every engine."""

    def fingerprints(self, source: Source) -> dict[str, Fingerprint]:
        """Files the commit log replays this source from, which must stay unchanged."""
        return {}


class BucketTransport(Transport):
    """A transport that sends each bucket as one message every rank reads."""

    @abstractmethod
    def send(self, source: Source, bucket: Bucket) -> BucketMessage:
        """The message every rank reads ``bucket`` from."""

    def deliver(self, source: Source, plan: Plan, context: DeliveryContext) -> Delivery:
        delivery = Delivery(iter(()))

        def steps() -> Iterator[tuple[RankCalls, int | None]]:
            for bucket in plan.buckets:
                message = self.send(source, bucket)
                delivery.replay.append(message)
                yield context.fleet.load_bucket(message), bucket.nbytes

        delivery.steps = steps()
        return delivery
