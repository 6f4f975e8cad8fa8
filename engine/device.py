"""Moved to :mod:`core.device` (the bottom layer); this name stays for code that imports it from here."""
from core.device import autocast, resolve_device, resolve_precision  # noqa: F401
