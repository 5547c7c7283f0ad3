"""The ingestion permission, read with the token and its person in one row: the same
answers as the permission check's own query, for a grant through a group, a direct grant,
none, a revoked one and a superuser."""

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from audit.models import AuditEvent
from audit.permissions import REFUSED
from trading.models import Candle

from .helpers import minute_candle

URL = "/api/v1/market/candles"
pytestmark = pytest.mark.django_db


def _post(user: User, i: int = 0):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return client.post(URL, [minute_candle(i)], format="json")


def _ingest_permission() -> Permission:
    return Permission.objects.get(content_type__app_label="audit", codename="ingest_candles")


def test_a_grant_through_a_group_is_read_with_the_token_and_not_queried_again(make_user):
    ops = make_user("ops", "Ops")
    with CaptureQueriesContext(connection) as queries:
        response = _post(ops)
    assert response.status_code == 201, response.json()
    reading_permissions = [q["sql"] for q in queries if '"auth_permission"' in q["sql"]]
    assert len(reading_permissions) == 1
    assert '"authtoken_token"' in reading_permissions[0]


def test_a_direct_grant_lets_the_person_post(make_user):
    feeder = make_user("feeder")
    feeder.user_permissions.add(_ingest_permission())
    assert _post(feeder).status_code == 201


def test_without_the_permission_the_post_is_refused_and_recorded(make_user):
    viewer = make_user("viewer", "Viewer")
    response = _post(viewer)
    assert response.status_code == 403
    assert not Candle.objects.exists()
    refusal = AuditEvent.objects.get(action=REFUSED)
    assert refusal.actor == "viewer"
    assert refusal.payload["permission"] == "audit.ingest_candles"


def test_a_revoked_grant_is_refused_on_the_next_request(make_user):
    feeder = make_user("feeder")
    feeder.user_permissions.add(_ingest_permission())
    assert _post(feeder, 0).status_code == 201
    feeder.user_permissions.remove(_ingest_permission())
    assert _post(feeder, 1).status_code == 403
    assert Candle.objects.count() == 1


def test_a_superuser_posts_without_a_grant(make_user):
    admin = make_user("root")
    admin.is_superuser = True
    admin.save()
    assert _post(admin).status_code == 201
