import json
import os
import secrets

from django.conf import settings
from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand
from django.db import transaction
from rest_framework.authtoken.models import Token

from audit.roles import ROLE_PERMISSIONS
from audit.services import audit_record


class Command(BaseCommand):
    help = "Create one demo user per role (first run only) and print their credentials."

    def add_arguments(self, parser):
        parser.add_argument("--url", default="http://127.0.0.1:8000")

    def handle(self, *args, url, **options):
        path = settings.VAR_DIR / "demo-credentials.json"
        creds = json.loads(path.read_text()) if path.exists() else {}
        with transaction.atomic():
            for role in ROLE_PERMISSIONS:
                username = role.lower()
                user = User.objects.filter(username=username).first()
                if user is None or username not in creds:
                    password = secrets.token_urlsafe(12)
                    user = user or User(username=username, email=f"{username}@localhost")
                    user.is_staff = True
                    user.set_password(password)
                    user.save()
                    user.groups.set([Group.objects.get(name=role)])
                    creds[username] = {"password": password, "role": role}
                    audit_record(
                        action="user.demo_create",
                        actor="demo_setup",
                        target=user,
                        payload={"role": role},
                    )
                creds[username]["token"] = Token.objects.get_or_create(user=user)[0].key
        path.write_text(json.dumps(creds, indent=2))
        os.chmod(path, 0o600)
        self.stdout.write(f"Demo users (log in at {url}/admin/; also kept in {path}):")
        for username, cred in creds.items():
            self.stdout.write(f"  {cred['role']:<8} user {username:<8} password {cred['password']}")
