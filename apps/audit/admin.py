from typing import Any

from django.contrib import admin
from django.contrib.admin.filters import AllValuesFieldListFilter
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from apps.audit.diff import diff, summary
from apps.audit.models import AuditEntry
from apps.tenants.admin_base import ReadOnlyAdmin, recent_filter


class ActorFilter(AllValuesFieldListFilter):
    """One choice per actor label that occurs (users by username, "system", API keys...)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.title = "actor"


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = ["at", "tenant", "actor_label", "action", "target_type", "target_id", "changes"]
    list_filter = [
        "tenant",
        ("actor_label", ActorFilter),
        "action",
        recent_filter("at"),
    ]
    list_select_related = ["tenant"]
    search_fields = ["actor_label", "action", "target_id"]
    date_hierarchy = "at"
    fields = ["at", "tenant", "actor", "actor_label", "action", "target_type", "target_id", "diff"]
    readonly_fields = ["diff"]

    @admin.display(description="changed keys")
    def changes(self, entry: AuditEntry) -> str:
        return summary(entry.before, entry.after)

    @admin.display(description="before / after")
    def diff(self, entry: AuditEntry) -> SafeString:
        rows = diff(entry.before, entry.after)
        if not rows:
            return format_html("<p>{}</p>", "Nothing recorded before or after.")
        body = format_html_join(
            "",
            '<tr class="sluice-diff-{}"><td>{}</td><td>{}</td><td><code>{}</code></td>'
            "<td><code>{}</code></td></tr>",
            ((row.change, row.key, row.change, row.before, row.after) for row in rows),
        )
        return format_html(
            '<table class="sluice-diff"><thead><tr><th>key</th><th>change</th>'
            "<th>before</th><th>after</th></tr></thead><tbody>{}</tbody></table>",
            body,
        )
