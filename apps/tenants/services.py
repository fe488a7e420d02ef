"""Writes for tenants, memberships, invitations and settings (API keys: api_keys.py). Each
validates first, then writes in one transaction with its audit row; a refused write raises
`Refused` (the fields it concerns and why) and has written nothing. Invite tokens never
reach the audit log, only an invitation's id."""

from decimal import Decimal
from typing import Any, NoReturn

from django.contrib.auth import get_user_model, password_validation
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone
from django.utils.text import slugify

from apps.audit.services import Actor, record
from apps.tenants.models import (
    INVITE_TTL,
    Invitation,
    InviteState,
    Membership,
    Role,
    Tenant,
    hash_api_secret,
)
from apps.tenants.quotas import SETTINGS_FIELDS, check_setting_value

FieldErrors = dict[str | None, list[str]]


class Refused(ValueError):
    """A write refused before anything was written. `errors` maps a form field (None: the
    whole form) to what is wrong with it."""

    def __init__(self, errors: FieldErrors) -> None:
        self.errors = errors
        super().__init__(" ".join(message for messages in errors.values() for message in messages))


class InviteUnusable(Refused):
    """The invitation is accepted, revoked or expired (`state`)."""

    def __init__(self, state: InviteState) -> None:
        self.state = state
        super().__init__({None: [f"This invite was {state.label.lower()}."]})


class AlreadyMember(Refused):
    pass


def refuse(field: str | None, message: str) -> NoReturn:
    raise Refused({field: [message]})


def _user_label(user: Any) -> str:
    return str(user.get_username())


# -- tenants --------------------------------------------------------------------------------

TENANT_NAME_MAX = 200


def slug_for(name: str) -> str:
    return slugify(name)[:63].strip("-")


def tenant_name_errors(name: str) -> list[str]:
    """What is wrong with `name` for a new tenant: empty, too long, no slug, slug taken."""
    name = name.strip()
    if not name:
        return ["Enter a name for the tenant."]
    if len(name) > TENANT_NAME_MAX:
        return [f"Use at most {TENANT_NAME_MAX} characters."]
    slug = slug_for(name)
    if not slug:
        return ["Use at least one letter or digit in the name."]
    if Tenant.objects.filter(slug=slug).exists():
        return [f"A tenant named “{slug}” already exists; choose another name."]
    return []


def create_tenant(*, slug: str, name: str, actor: Actor) -> Tenant:
    with transaction.atomic():
        tenant = Tenant.objects.create(slug=slug, name=name)
        record(
            tenant=tenant,
            actor=actor,
            action="tenant.create",
            target_type="tenant",
            target_id=tenant.pk,
            after={"slug": slug, "name": name},
        )
    return tenant


def create_tenant_with_owner(*, name: str, actor: AbstractBaseUser) -> Membership:
    """A new tenant named `name`, its slug derived, with `actor` as its owner."""
    errors = tenant_name_errors(name)
    if errors:
        raise Refused({"name": errors})
    try:
        with transaction.atomic():
            return _new_tenant_and_owner(name.strip(), actor, via="create")
    except IntegrityError:  # the slug was taken between the check and the insert
        raise Refused({"name": tenant_name_errors(name) or ["That name was just taken."]}) from None


def _new_tenant_and_owner(name: str, user: AbstractBaseUser, *, via: str) -> Membership:
    tenant = create_tenant(slug=slug_for(name), name=name, actor=user)
    return _add_membership(tenant, user, Role.OWNER, actor=user, via=via)


# -- sign-up --------------------------------------------------------------------------------


def signup_errors(
    *, username: str, email: str, password: str, tenant_name: str | None
) -> FieldErrors:
    """Every problem with a sign-up at once, by field."""
    User = get_user_model()
    errors: FieldErrors = {}
    if User.objects.filter(username__iexact=username).exists():
        errors["username"] = ["That username is taken; choose another, or log in."]
    if User.objects.filter(email__iexact=email).exists():
        errors["email"] = ["An account with this email exists already; log in instead."]
    try:
        password_validation.validate_password(password, User(username=username, email=email))
    except ValidationError as exc:
        errors["password"] = list(exc.messages)
    if tenant_name is not None and (problems := tenant_name_errors(tenant_name)):
        errors["tenant_name"] = problems
    return errors


def sign_up(
    *,
    username: str,
    email: str,
    password: str,
    tenant_name: str | None = None,
    invitation: Invitation | None = None,
) -> Membership:
    """A new user and their first membership: the owner of a new tenant named
    `tenant_name`, or, with `invitation`, a member of the inviting tenant in its role.
    The actor of the audit rows is the new user (there is no one else)."""
    if (tenant_name is None) == (invitation is None):
        raise ValueError("sign_up needs exactly one of tenant_name and invitation")
    username, email = username.strip(), get_user_model().objects.normalize_email(email.strip())
    errors = signup_errors(
        username=username, email=email, password=password, tenant_name=tenant_name
    )
    if errors:
        raise Refused(errors)
    try:
        with transaction.atomic():
            user = get_user_model().objects.create_user(username, email, password)
            if invitation is not None:
                membership = _accept(invitation, user, via="signup")
            else:
                assert tenant_name is not None
                membership = _new_tenant_and_owner(tenant_name.strip(), user, via="signup")
            record(
                tenant=membership.tenant,
                actor=user,
                action="user.signup",
                target_type="user",
                target_id=user.pk,
                after={"username": username, "email": email},
            )
    except IntegrityError:  # a username or tenant slug taken between the check and now
        raise Refused(
            signup_errors(
                username=username, email=email, password=password, tenant_name=tenant_name
            )
            or {None: ["Someone signed up with the same details just now; try again."]}
        ) from None
    return membership


# -- members --------------------------------------------------------------------------------

LAST_OWNER = "{tenant} needs at least one owner: make another member owner first."


def _add_membership(
    tenant: Tenant, user: AbstractBaseUser, role: Role, *, actor: Actor, via: str | None = None
) -> Membership:
    membership = Membership.unscoped_all_tenants.create(tenant=tenant, user=user, role=role)
    after = {"user": user.get_username(), "role": role.value}
    record(
        tenant=tenant,
        actor=actor,
        action="membership.add",
        target_type="membership",
        target_id=membership.pk,
        after={**after, "via": via} if via else after,
    )
    return membership


def add_member(*, tenant: Tenant, user: AbstractBaseUser, role: Role, actor: Actor) -> Membership:
    with transaction.atomic():
        return _add_membership(tenant, user, role, actor=actor)


def _locked_owners(tenant_id: int) -> list[int]:
    return list(
        Membership.unscoped_all_tenants.select_for_update()
        .filter(tenant_id=tenant_id, role=Role.OWNER)
        .order_by("pk")
        .values_list("pk", flat=True)
    )


def change_role(*, membership: Membership, role: str, actor: Actor) -> bool:
    """False when the member already had `role` (nothing written)."""
    if role not in Role.values:
        refuse("role", f"Choose one of {', '.join(Role.values)}.")
    with transaction.atomic():
        owners = _locked_owners(membership.tenant_id)
        current = Membership.unscoped_all_tenants.select_for_update().get(pk=membership.pk)
        if current.role == role:
            return False
        if owners == [current.pk]:
            refuse("role", LAST_OWNER.format(tenant=membership.tenant.name))
        Membership.unscoped_all_tenants.filter(pk=current.pk).update(role=role)
        record(
            tenant=membership.tenant,
            actor=actor,
            action="membership.change",
            target_type="membership",
            target_id=current.pk,
            before={"user": _user_label(current.user), "role": current.role},
            after={"user": _user_label(current.user), "role": role},
        )
    membership.role = role
    return True


def remove_member(*, membership: Membership, actor: Actor) -> None:
    with transaction.atomic():
        owners = _locked_owners(membership.tenant_id)
        current = Membership.unscoped_all_tenants.select_for_update().get(pk=membership.pk)
        if owners == [current.pk]:
            refuse(None, LAST_OWNER.format(tenant=membership.tenant.name))
        current.delete()
        record(
            tenant=membership.tenant,
            actor=actor,
            action="membership.remove",
            target_type="membership",
            target_id=membership.pk,
            before={"user": _user_label(current.user), "role": current.role},
        )


# -- invitations ----------------------------------------------------------------------------


def accept_link(base_url: str, token: str) -> str:
    return base_url.rstrip("/") + reverse("tenants:accept_invite", args=[token])


def invite_errors(*, tenant: Tenant, email: str, role: str) -> FieldErrors:
    errors: FieldErrors = {}
    try:
        validate_email(email)
    except ValidationError:
        errors["email"] = ["Enter a valid email address."]
    if role not in Role.values:
        errors["role"] = [f"Choose one of {', '.join(Role.values)}."]
    if errors:
        return errors
    members = Membership.unscoped_all_tenants.filter(tenant=tenant, user__email__iexact=email)
    if members.exists():
        errors["email"] = [f"{email} is already a member of {tenant.name}."]
    pending = Invitation.unscoped_all_tenants.filter(
        tenant=tenant,
        email__iexact=email,
        accepted_at__isnull=True,
        revoked_at__isnull=True,
        expires_at__gt=timezone.now(),
    )
    if pending.exists():
        errors["email"] = [
            f"An invite to {email} is pending already; revoke it below to send a new one."
        ]
    return errors


def invite_member(
    *, tenant: Tenant, email: str, role: str, base_url: str, actor: AbstractBaseUser
) -> tuple[Invitation, str]:
    """An invitation to `email` and the link that accepts it (shown once; mailed on
    commit). `base_url` is the site's scheme and host for the link."""
    email = email.strip()
    errors = invite_errors(tenant=tenant, email=email, role=role)
    if errors:
        raise Refused(errors)
    token = Invitation.new_token()
    link = accept_link(base_url, token)
    with transaction.atomic():
        invitation = Invitation.unscoped_all_tenants.create(
            tenant=tenant,
            email=email,
            role=role,
            token_hash=hash_api_secret(token),
            invited_by=actor,
            expires_at=timezone.now() + INVITE_TTL,
        )
        record(
            tenant=tenant,
            actor=actor,
            action="invite.create",
            target_type="invitation",
            target_id=invitation.pk,
            after={"email": email, "role": role, "expires_at": invitation.expires_at.isoformat()},
        )
        inviter = actor.get_username()
        transaction.on_commit(
            lambda: _send_invite(tenant.name, inviter, email, role, link), robust=True
        )
    return invitation, link


def _send_invite(tenant_name: str, inviter: str, email: str, role: str, link: str) -> None:
    body = (
        f"{inviter} invites you to join {tenant_name} on Sluice as {role}.\n\n"
        f"Accept the invitation here (the link works once, for {INVITE_TTL.days} days):\n"
        f"{link}\n\n"
        "If you did not expect this, ignore this mail.\n"
    )
    send_mail(f"Join {tenant_name} on Sluice", body, None, [email])


def invitation_for_token(token: str) -> Invitation | None:
    """The invitation behind a link, of any tenant and state (the link names no tenant)."""
    return (
        Invitation.unscoped_all_tenants.select_related("tenant", "invited_by")
        .filter(token_hash=hash_api_secret(token))
        .first()
    )


def revoke_invite(*, invitation: Invitation, actor: Actor) -> None:
    with transaction.atomic():
        current = Invitation.unscoped_all_tenants.select_for_update().get(pk=invitation.pk)
        state = current.state()
        if state != InviteState.PENDING:
            raise InviteUnusable(state)
        current.revoked_at = timezone.now()
        current.save(update_fields=["revoked_at"])
        record(
            tenant=current.tenant,
            actor=actor,
            action="invite.revoke",
            target_type="invitation",
            target_id=current.pk,
            before={"email": current.email, "role": current.role, "state": "pending"},
            after={"email": current.email, "role": current.role, "state": "revoked"},
        )
    invitation.revoked_at = current.revoked_at


def accept_invite(*, invitation: Invitation, actor: AbstractBaseUser) -> Membership:
    """`actor` joins the inviting tenant in the invited role."""
    with transaction.atomic():
        return _accept(invitation, actor, via="invite")


def _accept(invitation: Invitation, user: AbstractBaseUser, *, via: str) -> Membership:
    current = (
        Invitation.unscoped_all_tenants.select_for_update()
        .select_related("tenant")
        .get(pk=invitation.pk)
    )
    state = current.state()
    if state != InviteState.PENDING:
        raise InviteUnusable(state)
    tenant = current.tenant
    existing = Membership.unscoped_all_tenants.filter(tenant=tenant, user=user).first()
    if existing is not None:
        raise AlreadyMember(
            {None: [f"You are a member of {tenant.name} already, as {existing.role}."]}
        )
    membership = _add_membership(tenant, user, Role(current.role), actor=user, via=via)
    current.accepted_at, current.accepted_by = timezone.now(), user
    current.save(update_fields=["accepted_at", "accepted_by"])
    record(
        tenant=tenant,
        actor=user,
        action="invite.accept",
        target_type="invitation",
        target_id=current.pk,
        before={"email": current.email, "role": current.role, "state": "pending"},
        after={"email": current.email, "role": current.role, "state": "accepted"},
    )
    return membership


# -- settings: budget, quotas and feed retention ------------------------------------------


def _audit_value(value: Decimal | int | None) -> str | int | None:
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    return value


def update_settings(*, tenant: Tenant, values: dict[str, Any], actor: Actor) -> list[str]:
    """Sets the monthly budget, the quotas (None: no limit) and the feed's retention; returns
    the fields that changed. One audit row with before and after of exactly those fields."""
    errors: FieldErrors = {}
    for field, value in values.items():
        if field not in SETTINGS_FIELDS:
            raise ValueError(f"{field} is not a settings field")
        if problem := check_setting_value(field, value):
            errors[field] = [problem]
    if errors:
        raise Refused(errors)
    with transaction.atomic():
        current = Tenant.objects.select_for_update().get(pk=tenant.pk)
        changed = [field for field, value in values.items() if getattr(current, field) != value]
        if not changed:
            return []
        before = {field: _audit_value(getattr(current, field)) for field in changed}
        for field in changed:
            setattr(current, field, values[field])
        current.save(update_fields=changed)
        record(
            tenant=current,
            actor=actor,
            action="tenant.settings",
            target_type="tenant",
            target_id=current.pk,
            before=before,
            after={field: _audit_value(values[field]) for field in changed},
        )
    for field in changed:
        setattr(tenant, field, values[field])
    return changed
