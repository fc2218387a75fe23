"""The balancer's aiohttp application: the optional bearer-token middleware, the route table (stock API
with and without /api, the seed API, /ws, everything else proxied) and the Balancer's lifetime."""
from __future__ import annotations

from aiohttp import web

from .dispatch import Balancer
from .routes import Routes, error


def make_app(balancer: Balancer) -> web.Application:
    token = balancer.settings.token
    routes = Routes(balancer)

    @web.middleware
    async def auth(request, handler):
        if token and request.path not in ("/health",) and \
                request.headers.get("Authorization", "") != f"Bearer {token}" and \
                request.query.get("token") != token:
            return error(401, "unauthorized", "send Authorization: Bearer <token>")
        return await handler(request)

    app = web.Application(middlewares=[auth], client_max_size=1024 ** 3)
    for prefix in ("", "/api"):
        app.router.add_post(prefix + "/prompt", routes.post_prompt)
        app.router.add_get(prefix + "/queue", routes.get_queue)
        app.router.add_post(prefix + "/queue", routes.post_to_all)
        app.router.add_post(prefix + "/free", routes.post_to_all)
        app.router.add_post(prefix + "/history", routes.post_to_all)
        app.router.add_post(prefix + "/interrupt", routes.post_interrupt)
        app.router.add_get(prefix + "/history", routes.get_history)
        app.router.add_get(prefix + "/history/{prompt_id}", routes.get_history)
        app.router.add_get(prefix + "/view", routes.get_view)
        app.router.add_post(prefix + "/upload/image", routes.post_upload)
        app.router.add_post(prefix + "/upload/mask", routes.post_upload)
    app.router.add_get("/ws", routes.websocket)
    app.router.add_post("/generate", routes.post_generate)
    app.router.add_get("/status", routes.get_status)
    app.router.add_get("/health", routes.get_health)
    app.router.add_get("/instances", routes.get_instances)
    app.router.add_route("*", "/{tail:.*}", routes.proxy)
    app.cleanup_ctx.append(balancer.lifetime)
    return app
