"""Tenant self-service pages: sign-up, the user's tenants (create, switch), members and
invitations, API keys, and settings (quotas, budget, feed retention).

Every write checks the role here, on the server, whatever the page showed, and goes
through apps.tenants.services; what a service refuses is shown on the field it concerns.
Objects named in a URL come from the current tenant's scoped managers (404 otherwise).
A new invite's link is rendered in the answer to the POST that made it. A new API key's
secret goes through one redirect (so a reload cannot make a second key): it waits in the
session, encrypted, for the one page that shows it and removes it."""

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.contrib import messages
from django.contrib.auth import login
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from apps.runs.models import ACTIVE_RUN_STATUSES, Run
from apps.secrets.crypto import decrypt, encrypt
from apps.tenants.access import (
    api_key_by_id,
    invitation_by_id,
    login_required,
    member_by_id,
    membership_of,
    require_role,
    tenant_member_required,
    to_login,
)
from apps.tenants.api_keys import create_api_key, revoke_api_key
from apps.tenants.forms import (
    ApiKeyForm,
    InviteForm,
    RoleForm,
    SettingsForm,
    SignupForm,
    SwitchForm,
    TenantForm,
    attach,
)
from apps.tenants.middleware import choose_tenant, set_current_tenant
from apps.tenants.models import ApiKey, Invitation, InviteState, Membership, Role
from apps.tenants.quotas import SETTINGS_FIELDS
from apps.tenants.services import (
    AlreadyMember,
    InviteUnusable,
    Refused,
    accept_invite,
    change_role,
    create_tenant_with_owner,
    invitation_for_token,
    invite_member,
    remove_member,
    revoke_invite,
    sign_up,
    update_settings,
)


def _plain(value: Any) -> Any:
    """50.000000 shown as 50."""
    return format(value.normalize(), "f") if isinstance(value, Decimal) else value


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _status(form: Any) -> int:
    return 400 if form.errors else 200


def _enter(request: HttpRequest, membership: Membership) -> None:
    """Makes the membership's tenant the session's current one."""
    set_current_tenant(request, membership.tenant_id)


# -- sign-up and invitations ----------------------------------------------------------------


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    token = request.POST.get("invite") or request.GET.get("invite") or ""
    invitation = invitation_for_token(token) if token else None
    if token and (invitation is None or invitation.state() != InviteState.PENDING):
        return _invite_problem(request, invitation)
    if request.user.is_authenticated:
        if token:
            return redirect("tenants:accept_invite", token=token)
        return redirect("tenants:create")
    joining = invitation is not None
    initial = {"email": invitation.email} if invitation is not None else None
    form = SignupForm(request.POST or None, joining=joining, initial=initial)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            membership = sign_up(
                username=data["username"],
                email=data["email"],
                password=data["password"],
                tenant_name=None if joining else data["tenant_name"],
                invitation=invitation,
            )
        except InviteUnusable:
            return _invite_problem(request, invitation)
        except Refused as exc:
            attach(form, exc)
        else:
            login(request, membership.user)
            _enter(request, membership)
            messages.success(
                request, f"Welcome! You are {membership.role} of {membership.tenant.name}."
            )
            return redirect("graphs:list")
    context = {"form": form, "invitation": invitation, "token": token}
    return render(request, "registration/signup.html", context, status=_status(form))


INVITE_PROBLEMS = {
    InviteState.EXPIRED: "This invite has expired",
    InviteState.REVOKED: "This invite was withdrawn",
    InviteState.ACCEPTED: "This invite has been used",
}
NOT_VALID = "This invite link is not valid"


def _invite_problem(request: HttpRequest, invitation: Invitation | None) -> HttpResponse:
    """404 for a link that matches nothing; 410 for one that did and no longer works."""
    state = invitation.state() if invitation is not None else None
    context = {
        "invitation": invitation,
        "state": state.value if state else "unknown",
        "title": INVITE_PROBLEMS[state] if state is not None else NOT_VALID,
        "mine": invitation is not None
        and request.user.is_authenticated
        and invitation.accepted_by_id == request.user.pk,
    }
    return render(
        request, "tenants/invite_problem.html", context, status=404 if state is None else 410
    )


@require_http_methods(["GET", "POST"])
def accept_invite_view(request: HttpRequest, token: str) -> HttpResponse:
    invitation = invitation_for_token(token)
    if invitation is None or invitation.state() != InviteState.PENDING:
        return _invite_problem(request, invitation)
    if not request.user.is_authenticated:
        if request.method == "POST":
            return to_login(request)
        return render(request, "tenants/invite.html", {"invitation": invitation, "token": token})
    existing = Membership.unscoped_all_tenants.filter(
        tenant=invitation.tenant, user=request.user
    ).first()
    if request.method == "POST" and existing is None:
        try:
            membership = accept_invite(invitation=invitation, actor=request.user)
        except InviteUnusable:
            return _invite_problem(request, invitation)
        except AlreadyMember:
            existing = Membership.unscoped_all_tenants.get(
                tenant=invitation.tenant, user=request.user
            )
        else:
            _enter(request, membership)
            messages.success(request, f"You joined {membership.tenant.name} as {membership.role}.")
            return redirect("graphs:list")
    context = {"invitation": invitation, "token": token, "existing": existing}
    return render(request, "tenants/invite.html", context)


# -- the user's tenants ---------------------------------------------------------------------


@require_GET
@login_required
def tenant_list(request: HttpRequest) -> HttpResponse:
    memberships = (
        Membership.unscoped_all_tenants.select_related("tenant")
        .filter(user=request.user)
        .order_by("tenant__name", "tenant_id")
    )
    current = getattr(request, "membership", None)
    context = {"memberships": memberships, "current_tenant_id": current and current.tenant_id}
    return render(request, "tenants/list.html", context)


@require_http_methods(["GET", "POST"])
@login_required
def create_tenant_view(request: HttpRequest) -> HttpResponse:
    form = TenantForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            membership = create_tenant_with_owner(
                name=form.cleaned_data["name"],
                actor=request.user,  # type: ignore[arg-type]
            )
        except Refused as exc:
            attach(form, exc)
        else:
            _enter(request, membership)
            messages.success(request, f"{membership.tenant.name} created; you are its owner.")
            return redirect("graphs:list")
    return render(request, "tenants/create.html", {"form": form}, status=_status(form))


@require_POST
@login_required
def switch_tenant(request: HttpRequest) -> HttpResponse:
    form = SwitchForm(request.POST)
    if not form.is_valid():
        raise Http404("No such tenant.")
    membership = choose_tenant(request, form.cleaned_data["tenant"])
    messages.info(request, f"Now in {membership.tenant.name}, as {membership.role}.")
    target = form.cleaned_data["next"]
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return redirect(target)
    return redirect("graphs:list")


# -- members and invitations ----------------------------------------------------------------


@dataclass(frozen=True)
class MemberRow:
    membership: Membership
    errors: list[str] = field(default_factory=list)


@require_GET
@tenant_member_required
def members(request: HttpRequest) -> HttpResponse:
    return _members_page(request)


def _members_page(
    request: HttpRequest,
    *,
    invite_form: InviteForm | None = None,
    new_invite: tuple[Invitation, str] | None = None,
    row_errors: dict[int, list[str]] | None = None,
    status: int = 200,
) -> HttpResponse:
    membership = membership_of(request)
    is_owner = membership.allows(Role.OWNER)
    errors = row_errors or {}
    rows = [
        MemberRow(row, errors.get(row.pk, []))
        for row in Membership.objects.select_related("user").order_by("created_at", "pk")
    ]
    pending = (
        Invitation.objects.select_related("invited_by")
        .filter(accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=timezone.now())
        .order_by("-created_at")
        if is_owner
        else Invitation.objects.none()
    )
    context = {
        "rows": rows,
        "is_owner": is_owner,
        "pending": pending,
        "invite_form": invite_form or InviteForm(),
        "new_invite": new_invite,
        "roles": list(Role),
    }
    response = render(request, "tenants/members.html", context, status=status)
    if new_invite is not None:
        add_never_cache_headers(response)
    return response


@require_POST
@tenant_member_required
def change_role_view(request: HttpRequest, membership_id: int) -> HttpResponse:
    require_role(request, Role.OWNER)
    target = member_by_id(membership_id)
    form = RoleForm(request.POST)
    if not form.is_valid():
        errors = [str(e) for e in form.errors.get("role", ["Choose a role."])]
        return _members_page(request, row_errors={target.pk: errors}, status=400)
    try:
        changed = change_role(membership=target, role=form.cleaned_data["role"], actor=request.user)
    except Refused as exc:
        errors = [m for ms in exc.errors.values() for m in ms]
        return _members_page(request, row_errors={target.pk: errors}, status=400)
    name = target.user.get_username()
    if changed:
        messages.success(request, f"{name} is now {target.role}.")
    else:
        messages.info(request, f"{name} was {target.role} already; nothing changed.")
    return redirect("tenants:members")


@require_POST
@tenant_member_required
def remove_member_view(request: HttpRequest, membership_id: int) -> HttpResponse:
    require_role(request, Role.OWNER)
    target = member_by_id(membership_id)
    try:
        remove_member(membership=target, actor=request.user)
    except Refused as exc:
        errors = [m for ms in exc.errors.values() for m in ms]
        return _members_page(request, row_errors={target.pk: errors}, status=400)
    tenant = target.tenant.name
    if target.user_id == request.user.pk:
        messages.success(request, f"You left {tenant}.")
        return redirect("tenants:list")
    messages.success(request, f"{target.user.get_username()} was removed from {tenant}.")
    return redirect("tenants:members")


@require_POST
@tenant_member_required
def invite_view(request: HttpRequest) -> HttpResponse:
    membership = require_role(request, Role.OWNER)
    form = InviteForm(request.POST)
    if form.is_valid():
        try:
            new_invite = invite_member(
                tenant=membership.tenant,
                email=form.cleaned_data["email"],
                role=form.cleaned_data["role"],
                base_url=request.build_absolute_uri("/"),
                actor=request.user,  # type: ignore[arg-type]
            )
        except Refused as exc:
            attach(form, exc)
        else:
            return _members_page(request, new_invite=new_invite)
    return _members_page(request, invite_form=form, status=400)


@require_POST
@tenant_member_required
def revoke_invite_view(request: HttpRequest, invitation_id: int) -> HttpResponse:
    require_role(request, Role.OWNER)
    invitation = invitation_by_id(invitation_id)
    try:
        revoke_invite(invitation=invitation, actor=request.user)
    except InviteUnusable as exc:
        messages.error(request, f"Not revoked: the invite to {invitation.email} was {exc.state}.")
    else:
        messages.success(request, f"The invite to {invitation.email} was revoked.")
    return redirect("tenants:members")


# -- API keys -------------------------------------------------------------------------------


# A new key's secret waits here, encrypted like tenant secrets, between the POST that made it
# and the page that shows it (post/redirect/get: a reload repeats the GET, not the creation).
NEW_KEY_SESSION_KEY = "sluice_new_api_key"


@require_GET
@tenant_member_required
def keys(request: HttpRequest) -> HttpResponse:
    waiting = request.session.pop(NEW_KEY_SESSION_KEY, None)
    new_key = None
    if isinstance(waiting, dict):
        # Only a key of the current tenant: the session may have switched tenants since.
        key = ApiKey.objects.filter(pk=waiting.get("id")).first()
        if key is not None:
            new_key = (key, decrypt(str(waiting.get("secret", "")), name=key.name))
    return _keys_page(request, new_key=new_key)


def _keys_page(
    request: HttpRequest,
    *,
    form: ApiKeyForm | None = None,
    new_key: tuple[ApiKey, str] | None = None,
    status: int = 200,
) -> HttpResponse:
    membership = require_role(request, Role.EDITOR)
    context = {
        "keys": ApiKey.objects.select_related("created_by").order_by("-created_at", "-pk"),
        "can_write": membership.allows(Role.OWNER),
        "form": form or ApiKeyForm(),
        "new_key": new_key,
    }
    response = render(request, "tenants/keys.html", context, status=status)
    add_never_cache_headers(response)
    return response


@require_POST
@tenant_member_required
def create_key_view(request: HttpRequest) -> HttpResponse:
    membership = require_role(request, Role.OWNER)
    form = ApiKeyForm(request.POST)
    if form.is_valid():
        try:
            new_key = create_api_key(
                tenant=membership.tenant,
                name=form.cleaned_data["name"],
                scopes=form.cleaned_data["scopes"],
                actor=request.user,
            )
        except Refused as exc:
            attach(form, exc)
        else:
            key, secret = new_key
            request.session[NEW_KEY_SESSION_KEY] = {"id": key.pk, "secret": encrypt(secret)}
            return redirect("tenants:keys")
    return _keys_page(request, form=form, status=400)


@require_POST
@tenant_member_required
def revoke_key_view(request: HttpRequest, key_id: int) -> HttpResponse:
    require_role(request, Role.OWNER)
    key = api_key_by_id(key_id)
    try:
        revoke_api_key(key=key, actor=request.user)
    except Refused as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"The key “{key.name}” was revoked; it no longer works.")
    return redirect("tenants:keys")


# -- settings -------------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
@tenant_member_required
def settings_view(request: HttpRequest) -> HttpResponse:
    membership = membership_of(request)
    tenant = membership.tenant
    can_write = membership.allows(Role.OWNER)
    if request.method == "POST":
        require_role(request, Role.OWNER)
        form = SettingsForm(request.POST)
        if form.is_valid():
            try:
                changed = update_settings(
                    tenant=tenant, values=form.cleaned_data, actor=request.user
                )
            except Refused as exc:
                attach(form, exc)
            else:
                if changed:
                    labels = ", ".join(_lower_first(str(form.fields[n].label)) for n in changed)
                    messages.success(request, f"Saved: {labels}.")
                else:
                    messages.info(request, "Nothing changed.")
                return redirect("tenants:settings")
    else:
        initial = {name: _plain(getattr(tenant, name)) for name in SETTINGS_FIELDS}
        form = SettingsForm(initial=initial)
    if not can_write:
        for form_field in form.fields.values():
            form_field.disabled = True
    active = Run.objects.filter(status__in=ACTIVE_RUN_STATUSES).count()
    context = {"form": form, "can_write": can_write, "active_runs": active}
    return render(request, "tenants/settings.html", context, status=_status(form))
