"""The OpenAI-compatible server: protocol.py (requests, responses, errors), media.py (which image URLs
a request may use), scheduler.py (the engine thread and its batched decoding), app.py (the routes)."""
