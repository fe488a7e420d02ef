"""Keeping the leases of running steps alive from a background thread.

An operator blocked in a long call (an HTTP request, a model load) cannot heartbeat, yet its
lease must outlive the call while staying short enough that a killed worker's steps are
re-run within seconds. So each worker process renews the leases of every step it runs,
four times per lease, in one UPDATE. When the process dies the thread dies with it and the
leases run out; the sweeper then re-enqueues the steps.
"""

import logging
import os
import threading
from datetime import datetime, timedelta
from uuid import UUID

from django.conf import settings
from django.db import connection
from django.utils import timezone

from apps.runs.engine import store

logger = logging.getLogger(__name__)


def lease_until() -> datetime:
    return timezone.now() + timedelta(seconds=settings.SLUICE_STEP_LEASE_S)


class LeaseKeeper:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[UUID, UUID] = {}  # step id -> lease token
        self._lost: set[UUID] = set()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def hold(self, step_id: UUID, token: UUID) -> None:
        with self._lock:
            self._held[step_id] = token
            self._lost.discard(step_id)
            # A prefork child inherits the parent's object but not its thread: start anew.
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)
                self._thread.start()

    def release(self, step_id: UUID) -> None:
        with self._lock:
            self._held.pop(step_id, None)
            self._lost.discard(step_id)

    def lost(self, step_id: UUID) -> bool:
        """True once a renewal found the step no longer leased to this worker."""
        with self._lock:
            return step_id in self._lost

    def _loop(self) -> None:
        interval = settings.SLUICE_STEP_LEASE_S / 4
        stop = threading.Event()
        try:
            while not stop.wait(interval):
                try:
                    self.renew()
                except Exception:
                    logger.exception("lease renewal failed; will try again")
                    connection.close()  # a broken connection is replaced on the next try
                with self._lock:
                    if not self._held:
                        # Idle: end the thread, so an idle process holds no extra database
                        # connection; the next hold() starts a new one.
                        self._thread = None
                        return
        finally:
            connection.close()

    def renew(self) -> None:
        with self._lock:
            held = dict(self._held)
        if not held:
            return
        renewed = store.renew_leases(held, lease_until())
        with self._lock:
            for step_id, token in held.items():
                if step_id not in renewed and self._held.get(step_id) == token:
                    self._lost.add(step_id)


KEEPER = LeaseKeeper()
