from django.urls import path

app_name = "graphs"
urlpatterns: list[object] = []
