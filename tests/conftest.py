import os
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.test import TransactionTestCase

from apps.graphs.models import StreamGraph
from apps.graphs.services import create_graph
from apps.live.publisher import FEED
from apps.tenants.context import tenant_context
from apps.tenants.models import Role, Tenant
from apps.tenants.services import add_member, create_tenant
from tests.harness.platform import LOG_DIR, Platform
from tests.harness.plugin import KafkaUnavailable, wait_for_kafka
from workers.queues import CPU_WORKER_QUEUES

_flush_tables = TransactionTestCase._fixture_teardown  # type: ignore[attr-defined]


def _flush_tables_again_after_a_deadlock(self: TransactionTestCase) -> None:
    """A transactional test ends by truncating every table. A worker process may still be
    writing then (its live feed archives a finished run's last frames a moment later), and
    an insert's foreign-key lock against TRUNCATE's can deadlock, PostgreSQL choosing the
    TRUNCATE to fail; the writer is done a moment later, so try again."""
    for attempt in range(3):
        try:
            _flush_tables(self)
            return
        except Exception as exc:
            if attempt == 2 or "deadlock detected" not in repr(exc.__cause__ or exc):
                raise
            time.sleep(0.5)


TransactionTestCase._fixture_teardown = _flush_tables_again_after_a_deadlock  # type: ignore[attr-defined]


@pytest.fixture(scope="session", autouse=True)
def _fresh_logs() -> None:
    shutil.rmtree(LOG_DIR, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _feed_archive_let_go(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """Torn down before the test database is dropped: the live feed's archive thread keeps
    its connection while frames keep coming, and lets go of it on a flush."""
    yield
    FEED.flush()
    with django_db_blocker.unblock():
        _other_sessions_gone()


def _other_sessions_gone(wait_s: float = 5.0) -> None:
    """The test database is dropped next, which fails while any other session is on it. A
    process the harness stopped may take a moment to let go; one still there after
    `wait_s` is named on stderr (a leak to look at) and ended, so the drop succeeds."""
    from django.db import connection

    query = (
        "SELECT pid, application_name, backend_type, state, left(query, 120)"
        " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    deadline = time.monotonic() + wait_s
    with connection.cursor() as cursor:
        while True:
            cursor.execute(query)
            others = cursor.fetchall()
            if not others or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for pid, *about in others:
            print(f"\nStill on the test database at the end: {about}", file=sys.__stderr__)
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """The session's Kafka (`host:port`), once it answers. Without Java and Maven there is
    none: Kafka tests skip here, and fail under CI, which installs both."""
    try:
        return wait_for_kafka()
    except KafkaUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc}: CI runs every Kafka test")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def platform(
    request: pytest.FixtureRequest, django_db_setup: None, django_db_blocker: object
) -> Iterator[Platform]:
    """A cpu worker (prefork, like `make run`), a gpu worker (threads) and beat."""
    label = request.module.__name__.rsplit(".", 1)[-1]
    running = Platform(label)
    try:
        running.start_worker("cpu", CPU_WORKER_QUEUES, pool="prefork", concurrency=2)
        running.start_worker("gpu", ["gpu"], pool="threads", concurrency=8)
        running.start_beat()
        yield running
    finally:
        running.stop()


class World:
    """Two tenants: acme with an owner, an editor, an operator and a viewer; globex with an
    owner (the outsider)."""

    def __init__(self) -> None:
        self.acme = create_tenant(slug="acme", name="Acme", actor="test")
        self.globex = create_tenant(slug="globex", name="Globex", actor="test")
        self.owner = self.user("owner", self.acme, Role.OWNER)
        self.editor = self.user("editor", self.acme, Role.EDITOR)
        self.operator = self.user("operator", self.acme, Role.OPERATOR)
        self.viewer = self.user("viewer", self.acme, Role.VIEWER)
        self.outsider = self.user("outsider", self.globex, Role.OWNER)

    def user(self, name: str, tenant: Tenant, role: Role) -> AbstractBaseUser:
        user = get_user_model().objects.create_user(name, password="pw-" + name)
        add_member(tenant=tenant, user=user, role=role, actor="test")
        return user

    def graph(
        self, slug: str, spec: dict[str, object], tenant: Tenant | None = None
    ) -> StreamGraph:
        with tenant_context(tenant or self.acme):
            return create_graph(slug=slug, name=slug.title(), spec=spec, actor=self.owner)


@pytest.fixture
def world(db: None) -> World:
    return World()
