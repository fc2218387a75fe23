"""Operator tools run from the command line: Nginx config, endpoint check, quick check."""
