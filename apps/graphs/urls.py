from django.urls import path

from apps.graphs import views

app_name = "graphs"
urlpatterns = [
    path("", views.graph_list, name="list"),
    path("graphs/<slug:slug>/", views.graph_detail, name="detail"),
    path("graphs/<slug:slug>/runs/", views.start_run_view, name="start_run"),
    path("graphs/<slug:slug>/versions/", views.new_version_view, name="new_version"),
]
