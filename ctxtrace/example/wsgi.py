"""Module-level app for WSGI servers that want an object: ``gunicorn ctxtrace.example.wsgi:app``.

Importing this module builds an app; everything else in the package only builds one on request.
"""

from __future__ import annotations

from . import create_app

app = create_app()
