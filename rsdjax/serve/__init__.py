"""Serving: the OpenAI-compatible server over the slot engine (`app.create_app`) and the router
joining several servers behind one endpoint (`router.create_router_app`)."""
