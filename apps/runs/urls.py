from django.urls import path

from apps.runs import providers, views

app_name = "runs"
urlpatterns = [
    path("<uuid:run_id>/", views.run_detail, name="detail"),
    path("<uuid:run_id>/cancel/", views.cancel, name="cancel"),
    path("<uuid:run_id>/replay/", views.replay, name="replay"),
    # The run page's htmx partials; each reloads itself when the live feed says so.
    path("<uuid:run_id>/summary/", views.summary, name="summary"),
    path("<uuid:run_id>/graph/", views.graph, name="graph"),
    path("<uuid:run_id>/steps/", views.steps, name="steps"),
    path("<uuid:run_id>/steps/<uuid:step_id>/", views.step_detail, name="step"),
    path("<uuid:run_id>/results/", views.results, name="results"),
    # Flow control's state per model and provider; the figures poll themselves.
    path("providers/", providers.providers, name="providers"),
    path("providers/figures/", providers.provider_figures, name="provider-figures"),
]
