"""`make run`: migrate, create the demo users, start Redis (unless REDIS_URL is set), the
ASGI server, the Celery worker and beat and the demo market replay; Ctrl-C stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import PYTHON, ROOT, Stack  # noqa: E402


def main() -> int:
    env = dict(os.environ)
    env.setdefault("DEBUG", "true")
    env.setdefault("PYTHONUNBUFFERED", "1")
    var = Path(env.get("VAR_DIR", ROOT / "var"))
    port = int(env.get("PORT", "8000"))
    stack = Stack(env=env, log_dir=var / "log")

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        if not env.get("REDIS_URL"):
            env["REDIS_URL"] = stack.start_redis(var / "redis")
            print(f"private Redis started at {env['REDIS_URL']} (data in {var / 'redis'})")
        manage = [PYTHON, str(ROOT / "manage.py")]
        subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], env=env, check=True, cwd=ROOT)
        subprocess.run(
            [*manage, "demo_setup", "--url", f"http://127.0.0.1:{port}"],
            env=env,
            check=True,
            cwd=ROOT,
        )
        stack.start_web(port)
        stack.start_worker()
        stack.start_beat()
        if env.get("DEMO_REPLAY", "true").lower() in ("1", "true", "yes"):
            stack.start("replay", [*manage, "replay_csv", "--demo"])
        print(f"\n  Open http://127.0.0.1:{port}/  (admin: /admin/, health: /health)")
        print(f"  logs: {stack.log_dir}/   Ctrl-C stops everything.\n")
        while True:
            time.sleep(1)
            dead = [n for n in stack.dead() if n != "replay"]
            if dead:
                print(f"process(es) {', '.join(dead)} exited; see {stack.log_dir}; stopping")
                return 1
    except KeyboardInterrupt:
        print("\nstopping...")
        return 0
    except subprocess.CalledProcessError as exc:
        print(f"set-up step failed: {exc}")
        return 1
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
