"""`flashlite serve`: the OpenAI- and Anthropic-compatible HTTP server, with llama-server's flag names."""
from __future__ import annotations

import logging

import click

from flashlite.cli.run_cmd import load_model, load_options, spec_options


@click.command("serve")
@click.option("-m", "--model", "model_path", default=None, type=click.Path(dir_okay=False),
              help="deepseek4 GGUF file")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="0: any free port")
@click.option("-t", "--threads", default=None, type=click.IntRange(1, 256), help="threads, 1..256 (default: one per physical core, one fewer from 8)")
@click.option("-c", "--ctx-size", "ctx", default=None, type=click.IntRange(min=1),
              help="context length (default: the model's)")
@click.option("-np", "--parallel", default=4, show_default=True, type=click.IntRange(min=1),
              help="requests generating at once; more wait for a slot")
@click.option("--api-key", envvar="FLASHLITE_API_KEY", default=None,
              help="require `Authorization: Bearer KEY` or `x-api-key: KEY` (also from $FLASHLITE_API_KEY)")
@click.option("-a", "--alias", default=None, help="model id in the API (default: the GGUF's general.name)")
@click.option("-to", "--timeout", default=600, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="seconds a request's body may take to arrive, or a client to take a part of the answer")
@click.option("--idle-timeout", default=15, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="seconds a connection may take to send a request's head or sit idle between requests")
@click.option("--max-connections", default=256, show_default=True, type=click.IntRange(min=1),
              help="open connections at most; more are answered 503 and closed")
@load_options
@spec_options
def serve(model_path, host, port, threads, ctx, parallel, api_key, alias, timeout, idle_timeout, max_connections,
          load_opts, spec_opts):
    """Serve a model over OpenAI's and Anthropic's HTTP APIs (/v1/chat/completions, /v1/completions, /v1/models,
    /v1/messages, /tokenize, /health, /metrics). --spec-type / --spec-draft-n-max / -md are every answer's
    speculative decoding unless a request's `speculative.type` / `speculative.n_max` say otherwise."""
    from flashlite.server.app import ChatServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("uvicorn").setLevel(logging.WARNING)
    model = load_model(model_path, threads, ctx, load_opts, spec_opts)
    try:
        server = ChatServer(model, host, port, api_key=api_key, parallel=parallel, model_id=alias,
                            max_connections=max_connections, idle_timeout=idle_timeout, timeout=timeout)
    except OSError as exc:
        model.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    click.echo(f"serving {server.model_id!r} at {server.url}/v1 (Ctrl-C stops)")
    try:
        server.serve_forever(handle_signals=True)  # SIGINT / SIGTERM: answers in flight end "cancelled"
    except KeyboardInterrupt:
        pass
    finally:
        click.echo("shutting down", err=True)
        server.server_close()
        with model.lock:  # a cancelled answer may still be inside its last forward pass
            model.close()
