from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("runs", "0001_initial"), ("audit", "0002_append_only")]

    operations = [
        migrations.RunSQL(
            "CREATE TRIGGER event_immutable BEFORE UPDATE ON runs_event "
            "FOR EACH ROW EXECUTE FUNCTION sluice_refuse_change();",
            "DROP TRIGGER IF EXISTS event_immutable ON runs_event;",
        ),
    ]
