"""The reload engine's errors. Only these say "the source is at fault": the driver reports
them as ``CheckpointError``; any other exception raised on a rank is a rank failure."""

from __future__ import annotations


class ReloadError(ValueError):
    """The source does not fit the model (shape, dtype, a missing or duplicated tensor,
    NaN/Inf values); the message names the layer or tensor."""


class UnknownTensorError(ReloadError):
    """A checkpoint tensor name that maps to no parameter of the model."""


class PeerFailedError(RuntimeError):
    """This rank was fine, but another rank of its engine failed (failure consensus): the
    other rank's own error is the one to report."""
