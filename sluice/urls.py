from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from apps.live.sse import run_events

urlpatterns = [
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("runs/", include("apps.runs.urls")),
    path("tenant/secrets/", include("apps.secrets.urls")),
    path("usage/", include("apps.usage.urls")),
    path("", include("apps.tenants.urls")),
    path("", include("apps.editor.urls")),
    path("api/runs/<uuid:run_id>/events", run_events, name="run-events"),
    path("api/", include("apps.api.urls")),
    path("", include("apps.graphs.urls")),
]
