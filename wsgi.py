"""WSGI entry point for gunicorn: ``gunicorn wsgi:app``."""

from vmapi.app import create_app

app = create_app()
