"""Modules that tests ask the worker template to import (``SWEEPER_PRELOAD``), each breaking it
in one way that a user's own dependency could."""
