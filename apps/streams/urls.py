from django.urls import path

from apps.streams.views import pages

app_name = "streams"
urlpatterns = [
    path("", pages.deployment_list, name="list"),
    # "Deploy as stream" on a graph's page; the graph's slug comes in the form.
    path("deploy/", pages.deploy_graph, name="deploy"),
    path("<uuid:deployment_id>/", pages.deployment_detail, name="detail"),
    # The page's status part, polled by htmx.
    path("<uuid:deployment_id>/status/", pages.deployment_figures, name="status"),
    path("<uuid:deployment_id>/pause/", pages.pause_view, name="pause"),
    path("<uuid:deployment_id>/resume/", pages.resume_view, name="resume"),
    path("<uuid:deployment_id>/drain/", pages.drain_view, name="drain"),
    path("<uuid:deployment_id>/redeploy/", pages.redeploy_view, name="redeploy"),
    path("<uuid:deployment_id>/secret/", pages.secret_view, name="secret"),
    path(
        "<uuid:deployment_id>/dead-letters/<int:dead_letter_id>/replay/",
        pages.replay_view,
        name="replay",
    ),
]
