"""Replay a query log against old and new deployments and report where they disagree."""
