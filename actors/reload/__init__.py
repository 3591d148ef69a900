"""Layerwise reload: new weights into the tensors an engine already serves from.

Lifecycle on a rank (each step must be called after the previous one):
  1. ``ReloadEngine(model, device)`` at build time, while the model is on meta: records each
     layer's model-format placeholders and its ``restore_device``.
  2. ``start("first" | "reload")``: arms every layer (kernel tensors set aside, placeholders in).
  3. ``load(pairs)`` any number of times: loader calls are dry-run, their windows read, buffered;
     a layer is processed the moment it is complete.
  4. ``finish()``: attention layers last; untouched layers keep their tensors; partial layers
     raise. ``abort()`` instead puts every unprocessed layer back.

Limitations:
  1. Loaders must touch the source weight only through ``shape``, ``dtype``, ``narrow`` and
     ``to_tensor`` (the dry run substitutes a probe).
  2. A layer counts as complete when the elements its loaders wrote reach its element count;
     a quant method that pads model-format tensors must write (zero-fill) the padding too.
  3. Layers processed before a failure keep their new weights; the coordinator's transaction
     (not this engine) is what makes a failed reload invisible.
"""

from actors.reload.engine import ReloadEngine
from actors.reload.routes import Routing, route_tensors
from actors.reload.types import RankReloadStats, ReloadError

__all__ = ["RankReloadStats", "ReloadEngine", "ReloadError", "Routing", "route_tensors"]
