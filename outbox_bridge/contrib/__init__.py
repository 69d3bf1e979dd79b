"""Integrations: each module imports its library only when it is used."""
