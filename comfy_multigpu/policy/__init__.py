"""Pure policy: settings, request routing, placement, admission, eviction and API errors; no threads, no host."""
