from django.urls import path

from apps.editor import history, policies, run_dialog, views

app_name = "editor"
urlpatterns = [
    path("graphs/new/", views.new_graph_view, name="new_graph"),
    path("graphs/<slug:slug>/editor/", views.editor_page, name="edit"),
    path("graphs/<slug:slug>/editor/node-form", views.node_form_view, name="node_form"),
    path("graphs/<slug:slug>/editor/node-config", views.node_config_view, name="node_config"),
    path(
        "graphs/<slug:slug>/editor/policies-form", policies.policies_form_view, name="policies_form"
    ),
    path("graphs/<slug:slug>/editor/policies", policies.policies_view, name="policies"),
    path("graphs/<slug:slug>/editor/validate", views.validate_view, name="validate"),
    path("graphs/<slug:slug>/editor/layout", views.layout_view, name="layout"),
    path("graphs/<slug:slug>/editor/save", views.save_view, name="save"),
    path("graphs/<slug:slug>/editor/run-form", run_dialog.run_form_view, name="run_form"),
    path("graphs/<slug:slug>/editor/run", run_dialog.run_view, name="run"),
    path("graphs/<slug:slug>/history/", history.history_view, name="history"),
    path("graphs/<slug:slug>/history/diff", history.diff_view, name="diff"),
    path(
        "graphs/<slug:slug>/history/<int:number>/rollback",
        history.rollback_view,
        name="rollback",
    ),
    path("graphs/<slug:slug>/history/<int:number>/deploy", history.deploy_view, name="deploy"),
]
