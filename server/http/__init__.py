"""The HTTP edge: the FastAPI app, middleware, auth, problem+json errors, schemas and routes (the only room that knows HTTP)."""
