"""audit.permissions.holds answers as Django's User.has_perm does, in one query: a
permission given directly or through a group, an inactive person, a superuser, the same
codename under another app, and a configured backend that decides otherwise."""

from __future__ import annotations

import pytest
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.models import Group, Permission, User
from django.contrib.contenttypes.models import ContentType

from audit.permissions import holds

pytestmark = pytest.mark.django_db

PERMS = ["audit.ingest_candles", "audit.view_desk", "audit.restore_database", "other.view_desk"]


def _perm(codename: str, app_label: str = "audit") -> Permission:
    ct, _ = ContentType.objects.get_or_create(app_label=app_label, model="controlpermission")
    perm, _ = Permission.objects.get_or_create(
        codename=codename, content_type=ct, defaults={"name": codename}
    )
    return perm


@pytest.fixture
def people() -> dict[str, User]:
    _perm("view_desk", "other")  # the same codename under another app: never granted
    viewers = Group.objects.create(name="holds-viewers")
    viewers.permissions.add(_perm("view_desk"))
    direct = User.objects.create_user("holds-direct", password="x")
    direct.user_permissions.add(_perm("ingest_candles"))
    grouped = User.objects.create_user("holds-grouped", password="x")
    grouped.groups.add(viewers)
    both = User.objects.create_user("holds-both", password="x")
    both.groups.add(viewers)
    both.user_permissions.add(_perm("ingest_candles"))
    inactive = User.objects.create_user("holds-inactive", password="x", is_active=False)
    inactive.user_permissions.add(_perm("ingest_candles"))
    nobody = User.objects.create_user("holds-nobody", password="x")
    root = User.objects.create_superuser("holds-root", password="x")
    users = [direct, grouped, both, inactive, nobody, root]
    return {u.username: User.objects.get(pk=u.pk) for u in users}


def test_holds_agrees_with_has_perm(people):
    for user in people.values():
        for perm in PERMS:
            fresh = User.objects.get(pk=user.pk)
            expected = user.is_active and fresh.has_perm(perm)
            assert holds(User.objects.get(pk=user.pk), perm) is expected, (user.username, perm)
    assert holds(people["holds-direct"], "audit.ingest_candles")
    assert not holds(people["holds-direct"], "audit.view_desk")
    assert holds(people["holds-grouped"], "audit.view_desk")
    assert not holds(people["holds-grouped"], "other.view_desk")
    assert not holds(people["holds-inactive"], "audit.ingest_candles")
    assert holds(people["holds-root"], "audit.restore_database")


def test_one_query_per_check(people, django_assert_num_queries):
    user = people["holds-both"]
    with django_assert_num_queries(1):
        assert holds(user, "audit.ingest_candles")
    with django_assert_num_queries(1):
        assert not holds(user, "audit.restore_database")


def test_a_revoked_permission_is_refused_at_once(people):
    user = people["holds-grouped"]
    assert holds(User.objects.get(pk=user.pk), "audit.view_desk")
    user.groups.clear()
    assert not holds(User.objects.get(pk=user.pk), "audit.view_desk")


class DenyIngestBackend(ModelBackend):
    def has_perm(self, user_obj, perm, obj=None):
        return perm != "audit.ingest_candles" and super().has_perm(user_obj, perm, obj)


def test_a_backend_of_its_own_is_asked(people, settings):
    settings.AUTHENTICATION_BACKENDS = [f"{__name__}.DenyIngestBackend"]
    assert not holds(people["holds-direct"], "audit.ingest_candles")
    assert holds(people["holds-grouped"], "audit.view_desk")
