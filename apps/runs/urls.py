from django.urls import path

from apps.runs import views

app_name = "runs"
urlpatterns = [
    path("<uuid:run_id>/", views.run_detail, name="detail"),
    path("<uuid:run_id>/cancel/", views.cancel, name="cancel"),
    path("<uuid:run_id>/replay/", views.replay, name="replay"),
]
