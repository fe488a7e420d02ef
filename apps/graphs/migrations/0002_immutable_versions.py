from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("graphs", "0001_initial"), ("audit", "0002_append_only")]

    operations = [
        migrations.RunSQL(
            "CREATE TRIGGER graph_version_immutable BEFORE UPDATE ON graphs_graphversion "
            "FOR EACH ROW EXECUTE FUNCTION sluice_refuse_change();",
            "DROP TRIGGER IF EXISTS graph_version_immutable ON graphs_graphversion;",
        ),
    ]
