"""Layerwise reload: new weights into the tensors an engine already serves from.

Any engine takes part through one interface, ``ReloadableModel`` (``actors.reload.model``):
its layers with model-format placeholders, its checkpoint-name mapping, and its processing.

Lifecycle on a rank (each step must be called after the previous one):
  1. ``ReloadEngine(model, device)`` once: takes the model's layer records.
  2. ``start("first" | "reload")``: arms every layer (kernel tensors set aside, placeholders in).
  3. ``load(pairs)`` any number of times: loader calls are dry-run, their windows read, buffered;
     a layer is processed the moment it is complete.
  4. ``finish()``: attention layers last; untouched layers keep their tensors; partial layers
     raise. ``abort()`` instead puts every unprocessed layer back.

Limitations:
  1. Loaders find their shard with the free window algebra of ``actors.lazy.LazyWindow``
     (narrow, chunk, unsqueeze, select, ...); anything else reads the whole window they hold.
  2. A layer counts as complete when the elements its loaders wrote reach its element count;
     a quant method that pads model-format tensors must write (zero-fill) the padding too.
  3. Layers processed before a failure keep their new weights; the orchestrator's transaction
     (not this engine) is what makes a failed reload invisible.
"""

from actors.reload.errors import PeerFailedError, ReloadError, UnknownTensorError
from actors.reload.model import (
    LayerRecord,
    ReloadableModel,
    StageableModel,
    in_processing_order,
    param_owners,
)
from actors.reload.reload_engine import RANK_STAGES, ReloadEngine
from actors.reload.routes import RankRoute, Routing, TensorSpec, merge_routes, route_rank
from actors.reload.types import RankReloadStats

__all__ = [
    "RANK_STAGES",
    "LayerRecord",
    "PeerFailedError",
    "RankReloadStats",
    "RankRoute",
    "ReloadEngine",
    "ReloadError",
    "ReloadableModel",
    "StageableModel",
    "Routing",
    "TensorSpec",
    "UnknownTensorError",
    "in_processing_order",
    "merge_routes",
    "param_owners",
    "route_rank",
]
