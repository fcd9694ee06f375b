"""Typed client for the inference stack."""
