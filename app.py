"""The WSGI entry point, gunicorn's `app:application`: bb-worker built from the environment's settings.

Building it reads the settings and the circuit files; it starts nothing and writes nothing
(the VKs are computed once the worker serves, bbworker.web.service).
"""
import os

from bbworker.settings import Settings
from bbworker.web.app import create_app

application = create_app(Settings.from_environ(os.environ))
