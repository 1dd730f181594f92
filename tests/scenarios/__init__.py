"""Scenario suites: hostile input, reliability under kills and damage, several workers, and end to end on a
real Prefect server with its worker."""
