from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from apps.api.views import deployments, events, graphs, jobs, runs

app_name = "api"

urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
    path("graphs/", graphs.GraphListView.as_view(), name="graphs"),
    path("graphs/validate/", graphs.ValidateView.as_view(), name="graph-validate"),
    path("graphs/<slug:slug>/", graphs.GraphDetailView.as_view(), name="graph"),
    path("graphs/<slug:slug>/versions/", graphs.VersionListView.as_view(), name="versions"),
    path(
        "graphs/<slug:slug>/versions/<int:number>/",
        graphs.VersionDetailView.as_view(),
        name="version",
    ),
    path("graphs/<slug:slug>/diff/", graphs.DiffView.as_view(), name="graph-diff"),
    path("graphs/<slug:slug>/deploy/", graphs.DeployView.as_view(), name="graph-deploy"),
    path("graphs/<slug:slug>/estimate/", graphs.EstimateView.as_view(), name="graph-estimate"),
    path("graphs/<slug:slug>/events/", events.EventView.as_view(), name="events"),
    path("graphs/<slug:slug>/events/bulk/", events.BulkEventView.as_view(), name="events-bulk"),
    path("runs/", runs.RunListView.as_view(), name="runs"),
    path("runs/<uuid:run_id>/", runs.RunDetailView.as_view(), name="run"),
    path("runs/<uuid:run_id>/cancel/", runs.CancelView.as_view(), name="run-cancel"),
    path("runs/<uuid:run_id>/replay/", runs.ReplayView.as_view(), name="run-replay"),
    path("runs/<uuid:run_id>/outputs/", runs.OutputsView.as_view(), name="run-outputs"),
    path(
        "runs/<uuid:run_id>/outputs/<uuid:event_id>/lineage/",
        runs.LineageView.as_view(),
        name="run-output-lineage",
    ),
    path("jobs/", jobs.JobListView.as_view(), name="jobs"),
    path("jobs/<uuid:job_id>/", jobs.JobDetailView.as_view(), name="job"),
    path("jobs/<uuid:job_id>/cancel/", jobs.JobCancelView.as_view(), name="job-cancel"),
    path("jobs/<uuid:job_id>/results/", jobs.JobResultsView.as_view(), name="job-results"),
    path("deployments/", deployments.DeploymentListView.as_view(), name="deployments"),
    path(
        "deployments/<uuid:deployment_id>/",
        deployments.DeploymentDetailView.as_view(),
        name="deployment",
    ),
    path(
        "deployments/<uuid:deployment_id>/pause/",
        deployments.PauseView.as_view(),
        name="deployment-pause",
    ),
    path(
        "deployments/<uuid:deployment_id>/resume/",
        deployments.ResumeView.as_view(),
        name="deployment-resume",
    ),
    path(
        "deployments/<uuid:deployment_id>/drain/",
        deployments.DrainView.as_view(),
        name="deployment-drain",
    ),
    path(
        "deployments/<uuid:deployment_id>/redeploy/",
        deployments.RedeployView.as_view(),
        name="deployment-redeploy",
    ),
    path(
        "deployments/<uuid:deployment_id>/state/",
        deployments.StateView.as_view(),
        name="deployment-state",
    ),
    path(
        "deployments/<uuid:deployment_id>/state/preview/",
        deployments.StatePreviewView.as_view(),
        name="deployment-state-preview",
    ),
    path(
        "deployments/<uuid:deployment_id>/dead-letters/",
        deployments.DeadLetterListView.as_view(),
        name="deployment-dead-letters",
    ),
    path(
        "deployments/<uuid:deployment_id>/dead-letters/<int:dead_letter_id>/replay/",
        deployments.ReplayView.as_view(),
        name="deployment-dead-letter-replay",
    ),
]
