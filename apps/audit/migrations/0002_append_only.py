"""A trigger function that refuses changes to rows that must never change, attached here
to the audit log (no UPDATE, no DELETE). Graph versions and events attach it for UPDATE."""

from django.db import migrations

FUNCTION = """
CREATE OR REPLACE FUNCTION sluice_refuse_change() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION '% on % is not allowed: these rows are immutable', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END;
$$ LANGUAGE plpgsql;
"""


class Migration(migrations.Migration):
    dependencies = [("audit", "0001_initial")]

    operations = [
        migrations.RunSQL(FUNCTION, "DROP FUNCTION IF EXISTS sluice_refuse_change() CASCADE;"),
        migrations.RunSQL(
            "CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit_auditentry "
            "FOR EACH ROW EXECUTE FUNCTION sluice_refuse_change();",
            "DROP TRIGGER IF EXISTS audit_append_only ON audit_auditentry;",
        ),
    ]
