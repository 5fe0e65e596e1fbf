"""The Flask triage console."""
