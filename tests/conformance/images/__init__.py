"""Offline stand-ins for the images critest pulls (build.py)."""
