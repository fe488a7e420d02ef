"""Creates, idempotently, the demo tenant, a demo user and the demo graphs; prints how to
sign in. The password is random on first run and kept in var/demo-credentials."""

import secrets
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from apps.graphs.demo import DEMO_GRAPHS
from apps.graphs.models import StreamGraph
from apps.graphs.services import create_graph
from apps.tenants.context import tenant_context
from apps.tenants.models import Membership, Role, Tenant
from apps.tenants.services import add_member, create_tenant

DEMO_USERNAME = "demo"


class Command(BaseCommand):
    help = "Create the demo tenant, user and graphs if they do not exist, and print the login."

    def handle(self, *args: Any, **options: Any) -> None:
        with transaction.atomic():
            tenant = Tenant.objects.filter(slug="demo").first() or create_tenant(
                slug="demo", name="Demo", actor="seed_demo"
            )
            password = self._demo_user(tenant)
            with tenant_context(tenant):
                for graph in DEMO_GRAPHS:
                    if not StreamGraph.objects.filter(slug=graph["slug"]).exists():
                        create_graph(
                            slug=graph["slug"],
                            name=graph["name"],
                            description=graph["description"],
                            spec=graph["spec"],
                            actor="seed_demo",
                        )
        self.stdout.write(f"Demo login: username {DEMO_USERNAME!r}, password {password!r}")

    def _demo_user(self, tenant: Tenant) -> str:
        credentials = settings.VAR_DIR / "demo-credentials"
        User = get_user_model()
        user = User.objects.filter(username=DEMO_USERNAME).first()
        if user is None or not credentials.exists():
            password = secrets.token_urlsafe(9)
            if user is None:
                user = User.objects.create_user(
                    DEMO_USERNAME, password=password, is_staff=True, is_superuser=True
                )
            else:
                user.set_password(password)
                user.save(update_fields=["password"])
            credentials.parent.mkdir(parents=True, exist_ok=True)
            credentials.write_text(password)
            credentials.chmod(0o600)
        if not Membership.unscoped_all_tenants.filter(tenant=tenant, user=user).exists():
            add_member(tenant=tenant, user=user, role=Role.OWNER, actor="seed_demo")
        return credentials.read_text().strip()
