"""The HTTP layer: request scope and body checks, the middleware, our routes, /metrics and the dashboard feed."""
