"""Locust load tests and the `lma bench` harness (talks to the server over HTTP only)."""
