"""The folder ``ctxtrace run`` puts first on ``PYTHONPATH``; see ``ctxtrace._autostart``."""
