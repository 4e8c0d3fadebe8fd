"""Prefect flows, their configuration and the shoprank command line."""
