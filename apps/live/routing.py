"""WebSocket routes and the origin rule in front of them."""

from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path

from apps.live.access import header
from apps.live.consumers import RunFeedConsumer

websocket_urlpatterns = [
    path("ws/runs/<uuid:run_id>/", RunFeedConsumer.as_asgi()),
]


class OriginCheckedUnlessBearer:
    """Browsers send cookies with a cross-site WebSocket, so a connection relying on the
    session must come from one of our hosts. A connection with a bearer API key is
    authenticated by the key alone (the consumer ignores the session then), so it may come
    from a program that sends no Origin."""

    def __init__(self, app: Any) -> None:
        self.checked = AllowedHostsOriginValidator(app)
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if header(scope.get("headers", []), b"authorization") is not None:
            return await self.app(scope, receive, send)
        return await self.checked(scope, receive, send)


def websocket_application() -> Any:
    return OriginCheckedUnlessBearer(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))
