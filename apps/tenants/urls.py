from django.urls import path

from apps.tenants import views

app_name = "tenants"
urlpatterns = [
    path("signup/", views.signup, name="signup"),
    path("invites/<str:token>/", views.accept_invite_view, name="accept_invite"),
    path("tenants/", views.tenant_list, name="list"),
    path("tenants/new/", views.create_tenant_view, name="create"),
    path("tenants/switch/", views.switch_tenant, name="switch"),
    path("tenant/members/", views.members, name="members"),
    path("tenant/members/<int:membership_id>/role/", views.change_role_view, name="change_role"),
    path(
        "tenant/members/<int:membership_id>/remove/",
        views.remove_member_view,
        name="remove_member",
    ),
    path("tenant/invites/", views.invite_view, name="invite"),
    path(
        "tenant/invites/<int:invitation_id>/revoke/",
        views.revoke_invite_view,
        name="revoke_invite",
    ),
    path("tenant/keys/", views.keys, name="keys"),
    path("tenant/keys/new/", views.create_key_view, name="create_key"),
    path("tenant/keys/<int:key_id>/revoke/", views.revoke_key_view, name="revoke_key"),
    path("tenant/settings/", views.settings_view, name="settings"),
]
