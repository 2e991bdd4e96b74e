"""Serve trained runs over HTTP: OpenAI-style chat completions (captioners and chat models), search over a
retrieval index, Prometheus /metrics, dynamic batching and a web page at /. See serve/README.md."""
