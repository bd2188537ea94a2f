"""WSGI entry point for gunicorn: ``gunicorn wsgi:app``."""

from vmapi import create_app

app = create_app()
