"""Ends the process that imports it: a template that dies while it imports."""

import os

os._exit(1)
