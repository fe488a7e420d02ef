from apps.secrets.models import Secret
from apps.secrets.services import create_secret
from apps.tenants.context import tenant_context
from apps.tenants.models import Tenant
from tests.conftest import World


def add_secret(world: World, name: str, value: str, tenant: Tenant | None = None) -> Secret:
    tenant = tenant or world.acme
    actor = world.owner if tenant == world.acme else world.outsider
    with tenant_context(tenant):
        return create_secret(name=name, value=value, actor=actor)


def stored(tenant: Tenant, name: str) -> Secret | None:
    return Secret.unscoped_all_tenants.filter(tenant=tenant, name=name).first()
