from django.http import HttpRequest


def current_tenant(request: HttpRequest) -> dict[str, object]:
    membership = getattr(request, "membership", None)
    return {
        "membership": membership,
        "tenant": membership.tenant if membership is not None else None,
    }
