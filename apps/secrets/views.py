"""The secrets page: every member sees the names (editors reference them in graphs); owners
add secrets, replace values and delete them. Values are write-only: no page returns one."""

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from apps.secrets.access import secret_by_name
from apps.secrets.forms import NewSecretForm, ReplaceValueForm
from apps.secrets.models import Secret
from apps.secrets.services import (
    SecretInvalid,
    create_secret,
    delete_secret,
    replace_secret_value,
)
from apps.tenants.access import membership_of, require_role, tenant_member_required
from apps.tenants.models import Role


def _list_page(
    request: HttpRequest, form: NewSecretForm | None = None, *, status: int = 200
) -> HttpResponse:
    context = {
        "secrets": Secret.objects.select_related("created_by"),
        "can_manage": membership_of(request).allows(Role.OWNER),
        "form": form or NewSecretForm(),
    }
    return render(request, "secrets/list.html", context, status=status)


@require_GET
@tenant_member_required
def secret_list(request: HttpRequest) -> HttpResponse:
    return _list_page(request)


@require_POST
@tenant_member_required
def secret_create(request: HttpRequest) -> HttpResponse:
    require_role(request, Role.OWNER)
    form = NewSecretForm(request.POST)
    if form.is_valid():
        try:
            secret = create_secret(
                name=form.cleaned_data["name"], value=form.cleaned_data["value"], actor=request.user
            )
        except SecretInvalid as exc:
            form.add_error(exc.field, str(exc))
        else:
            messages.success(request, f"Secret {secret.name} added.")
            return redirect("secrets:list")
    return _list_page(request, form, status=400)


@require_http_methods(["GET", "POST"])
@tenant_member_required
def secret_replace(request: HttpRequest, name: str) -> HttpResponse:
    require_role(request, Role.OWNER)
    secret = secret_by_name(name)
    form = ReplaceValueForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            replace_secret_value(secret, value=form.cleaned_data["value"], actor=request.user)
        except SecretInvalid as exc:
            form.add_error(exc.field, str(exc))
        else:
            messages.success(request, f"The value of {secret.name} was replaced.")
            return redirect("secrets:list")
    status = 400 if request.method == "POST" else 200
    return render(request, "secrets/replace.html", {"secret": secret, "form": form}, status=status)


@require_http_methods(["GET", "POST"])
@tenant_member_required
def secret_delete(request: HttpRequest, name: str) -> HttpResponse:
    """GET asks for confirmation; POST deletes."""
    require_role(request, Role.OWNER)
    secret = secret_by_name(name)
    if request.method == "POST":
        delete_secret(secret, actor=request.user)
        messages.success(request, f"Secret {secret.name} deleted.")
        return redirect("secrets:list")
    return render(request, "secrets/delete.html", {"secret": secret})
