from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("audit", "0003_ingest_candles_permission"),
    ]

    operations = [
        migrations.AddField(
            model_name="auditchainhead",
            name="prev_hash",
            field=models.CharField(default="0" * 64, max_length=64),
        ),
    ]
