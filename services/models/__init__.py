"""Model conversion tools used by the command line (not a service)."""
