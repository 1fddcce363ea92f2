"""`minivlm serve`: an HTTP API over one model folder (OpenAI-compatible chat completions, native JSON
endpoints, Prometheus metrics, a web page), with dynamic batching.

    app.py      create_app(MODEL, ServeConfig): routes, error shapes, model loading
    batcher.py  the worker thread that gathers requests into model batches
    decode.py   batched caption decoding whose rows finish (and stream) independently
    inputs.py   data URLs -> checked RGB images
    limits.py   API key, content type and body size, before any handler
    metrics.py  Prometheus counters and histograms
    schemas.py  request / response bodies
    config.py   ServeConfig: batching, limits, access
    cli.py      `minivlm serve`
    page/       the web page at / (no CDN: works offline)
"""

from minivlm.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name):  # create_app imports FastAPI: only when asked for
    if name == "create_app":
        from minivlm.serve.app import create_app

        return create_app
    raise AttributeError(name)
