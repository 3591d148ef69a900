"""The gate every call passes: one lock orders reloads and serving calls, so a forward
never sees a half-applied version and every rank of an engine receives calls in the same
order; and a fleet that could not be rolled back refuses everything."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from orchestrator.errors import RecoveryError, ReloadInProgressError


class Gate:
    def __init__(self, serve_during_reload: str) -> None:
        self.serve_during_reload = serve_during_reload
        """'wait': serving calls wait for a running reload; 'fail': they raise at once."""
        self._lock = threading.RLock()
        self._reloading = False
        self.broken: str | None = None
        """Why the fleet is unusable (a rollback that failed), once it is."""

    @contextmanager
    def hold(self, reloading: bool = False) -> Iterator[None]:
        """Hold the engines: serving calls wait for a running reload (or raise), and a
        reload waits for them."""
        self._check()
        if not reloading and self._reloading and self.serve_during_reload == "fail":
            raise ReloadInProgressError("a reload is running (serve_during_reload='fail')")
        with self._lock:
            self._check()
            self._reloading = reloading or self._reloading
            try:
                yield
            finally:
                if reloading:
                    self._reloading = False

    def check_serving(self) -> None:
        """For requests, which never wait here (the engines hold them while a reload
        writes): refused while the fleet is broken, or during a reload with 'fail'."""
        self._check()
        if self._reloading and self.serve_during_reload == "fail":
            raise ReloadInProgressError("a reload is running (serve_during_reload='fail')")

    def _check(self) -> None:
        if self.broken is not None:
            raise RecoveryError(self.broken)
