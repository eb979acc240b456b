"""Tests of the units of work beyond requests: Celery, RQ, Click, threads, hand-over."""
