"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over :mod:`kivi_serve.engine`.

``create_app`` and ``run_cli`` live in :mod:`kivi_serve.server.app`.
"""
