"""Imported by Python at start-up in every process ``ctxtrace run`` starts."""

from ctxtrace._autostart import boot

boot()
