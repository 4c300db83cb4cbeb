"""Routing capture and streaming statistics."""
