"""The audit admin: readable, never writable, not even by a superuser."""

from __future__ import annotations

import pytest
from django.contrib.admin.sites import site
from django.contrib.auth.models import User
from django.test import Client, RequestFactory
from django.urls import reverse

from audit.models import AuditEvent
from audit.services import audit_record, audit_verify

CHANGELIST = reverse("admin:audit_auditevent_changelist")
ADD = reverse("admin:audit_auditevent_add")


def change_url(event: AuditEvent) -> str:
    return reverse("admin:audit_auditevent_change", args=[event.pk])


def delete_url(event: AuditEvent) -> str:
    return reverse("admin:audit_auditevent_delete", args=[event.pk])


@pytest.fixture
def event(db) -> AuditEvent:
    return audit_record(
        action="rollout.promote",
        actor="planner",
        target_type="canary.Rollout",
        target_id=42,
        payload={"phase": 2},
    )


@pytest.fixture
def superuser(db) -> User:
    return User.objects.create_superuser(username="root", password=None, email="r@localhost")


@pytest.fixture
def admin_client(client: Client, superuser: User) -> Client:
    client.force_login(superuser)
    return client


def test_superuser_sees_the_changelist(admin_client: Client, event: AuditEvent):
    response = admin_client.get(CHANGELIST)

    assert response.status_code == 200
    text = response.content.decode()
    assert "rollout.promote" in text
    assert "canary.Rollout:42" in text
    assert "delete_selected" not in text
    assert 'name="action"' not in text
    assert f'href="{ADD}"' not in text


def test_changelist_search_filter_and_date_hierarchy(admin_client: Client, event: AuditEvent):
    audit_record(action="alert.ack", actor="ops")

    searched = admin_client.get(CHANGELIST, {"q": "rollout"})
    filtered = admin_client.get(CHANGELIST, {"action": "alert.ack"})
    dated = admin_client.get(CHANGELIST, {"created_at__year": event.created_at.year})

    assert [e.action for e in searched.context["cl"].result_list] == ["rollout.promote"]
    assert [e.action for e in filtered.context["cl"].result_list] == ["alert.ack"]
    assert dated.status_code == 200 and len(dated.context["cl"].result_list) >= 2


def test_superuser_cannot_add(admin_client: Client, event: AuditEvent):
    assert admin_client.get(ADD).status_code == 403
    assert admin_client.post(ADD, {"action": "forged", "actor": "x"}).status_code == 403
    assert not AuditEvent.objects.filter(action="forged").exists()


def test_superuser_reads_but_cannot_change(admin_client: Client, event: AuditEvent):
    page = admin_client.get(change_url(event))
    posted = admin_client.post(change_url(event), {"action": "forged", "actor": "x"})

    assert page.status_code == 200
    assert event.hash in page.content.decode()
    assert 'name="_save"' not in page.content.decode()
    assert posted.status_code == 403
    assert AuditEvent.objects.get(pk=event.pk).action == "rollout.promote"


def test_superuser_cannot_delete(admin_client: Client, event: AuditEvent):
    assert admin_client.get(delete_url(event)).status_code == 403
    assert admin_client.post(delete_url(event), {"post": "yes"}).status_code == 403
    bulk = admin_client.post(
        CHANGELIST, {"action": "delete_selected", "_selected_action": [event.pk], "post": "yes"}
    )
    assert bulk.status_code in (200, 302)
    assert AuditEvent.objects.filter(pk=event.pk).exists()
    assert audit_verify() is None


def test_no_actions_even_for_a_superuser(superuser: User):
    request = RequestFactory().get(CHANGELIST)
    request.user = superuser

    model_admin = site._registry[AuditEvent]

    assert model_admin.get_actions(request) == {}
    assert not model_admin.has_add_permission(request)
    assert not model_admin.has_change_permission(request, None)
    assert not model_admin.has_delete_permission(request, None)


def test_desk_viewer_reads_the_trail(client: Client, make_user, event: AuditEvent):
    viewer = make_user("viewer", "Viewer", is_staff=True)
    client.force_login(viewer)

    assert client.get(CHANGELIST).status_code == 200
    assert client.get(change_url(event)).status_code == 200
    assert client.get(delete_url(event)).status_code == 403


def test_staff_without_desk_permission_is_refused(client: Client, make_user, event: AuditEvent):
    client.force_login(make_user("outsider", is_staff=True))

    assert client.get(CHANGELIST).status_code == 403
