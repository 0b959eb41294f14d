"""Contracts shared by every service: events, subjects, policy."""
