"""Every environment variable the settings read is documented in .env.example and README."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV_READ = re.compile(r"""env(?:\.\w+)?\(\s*["']([A-Z][A-Z0-9_]+)["']""")


def variables_read() -> set[str]:
    return set(ENV_READ.findall((ROOT / "config" / "settings.py").read_text()))


def test_settings_read_variables():
    assert {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "EMAIL_URL"} <= variables_read()


def test_every_variable_is_in_env_example():
    documented = set(
        re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M)
    )
    assert variables_read() - documented == set()


def test_every_variable_is_in_readme():
    readme = (ROOT / "README.md").read_text()
    assert {name for name in variables_read() if f"`{name}`" not in readme} == set()
