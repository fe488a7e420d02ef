from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponse
from django.urls import include, path
from django.views import defaults

from apps.live.sse import run_events
from apps.streams.views.hooks import receive_webhook
from sluice.problems import problem

urlpatterns = [
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("hooks/<uuid:deployment_id>/", receive_webhook, name="stream-webhook"),
    path("runs/", include("apps.runs.urls")),
    path("deployments/", include("apps.streams.urls")),
    path("tenant/secrets/", include("apps.secrets.urls")),
    path("usage/", include("apps.usage.urls")),
    path("", include("apps.tenants.urls")),
    path("", include("apps.editor.urls")),
    path("api/runs/<uuid:run_id>/events", run_events, name="run-events"),
    path("api/", include("apps.api.urls")),
    path("", include("apps.graphs.urls")),
]


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Programs get problem+json for an /api/ path no route matches (a malformed id), as
    for every other API error; people get the site's page."""
    if request.path.startswith("/api/"):
        return problem(404, "Not found", "No such endpoint or object; check the path.")
    return defaults.page_not_found(request, exception)


handler404 = not_found
