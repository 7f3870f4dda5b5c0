"""`salmonn serve`: one loaded model behind an OpenAI-compatible HTTP API and a page to use it.

Modules: errors (OpenAI's error shape), body (bounded request bodies, multipart in memory), worker
(the model's one thread and its queue), chat (/v1/chat/completions), audio_api (/v1/audio/...),
app (routes, API key, one log line per request), server (socket, uvicorn, signals), page/ (the
HTML page at /). Needs the `serve` extra (starlette, uvicorn, python-multipart).
"""
