from django.urls import path

from apps.secrets import views

app_name = "secrets"
urlpatterns = [
    path("", views.secret_list, name="list"),
    path("new/", views.secret_create, name="create"),
    path("<slug:name>/replace/", views.secret_replace, name="replace"),
    path("<slug:name>/delete/", views.secret_delete, name="delete"),
]
