"""An OpenAI-compatible HTTP server over the decoding steps, with continuous batching.

`multitoken serve --checkpoint DIR` (see `server.serve_cli`). The modules: `scheduler` (one thread owns
the model and drives `multitoken.decoding` for rows that join and leave), `app` (FastAPI routes and the
guard in front of them), `protocol` (request and response shapes), `chat` (chat templates), `text`
(streamed text), `metrics` (Prometheus). Needs the `serve` extra: pip install 'multitoken[serve]'.
"""
