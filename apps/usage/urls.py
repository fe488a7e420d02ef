from django.urls import path

from apps.usage import views

app_name = "usage"
urlpatterns = [path("", views.overview, name="overview")]
