"""`flashlite serve`: the OpenAI-compatible HTTP server, with llama-server's flag names."""
from __future__ import annotations

import logging
import signal

import click

from flashlite.run_cmd import load_model, load_options


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends the server as Ctrl-C does


@click.command("serve")
@click.option("-m", "--model", "model_path", default=None, type=click.Path(dir_okay=False),
              help="deepseek4 GGUF file")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="0: any free port")
@click.option("-t", "--threads", default=None, type=click.IntRange(1, 256), help="threads, 1..256 (default: all cores)")
@click.option("-c", "--ctx-size", "--ctx", "ctx", default=None, type=click.IntRange(min=1),
              help="context length (default: the model's)")
@click.option("-np", "--parallel", default=4, show_default=True, type=click.IntRange(min=1),
              help="requests generating at once; more wait for a slot")
@click.option("--api-key", envvar="FLASHLITE_API_KEY", default=None,
              help="require `Authorization: Bearer KEY` (also from $FLASHLITE_API_KEY)")
@click.option("-a", "--alias", default=None, help="model id in the API (default: the GGUF's general.name)")
@load_options
def serve(model_path, host, port, threads, ctx, parallel, api_key, alias, load_opts):
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health)."""
    from flashlite.server import ChatServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    model = load_model(model_path, threads, ctx, load_opts)
    try:
        server = ChatServer(model, host, port, api_key=api_key, parallel=parallel, model_id=alias)
    except OSError as exc:
        model.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    signal.signal(signal.SIGTERM, _interrupt)
    click.echo(f"serving {server.model_id!r} at {server.url}/v1 (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("shutting down", err=True)
    finally:
        server.server_close()
        with model.lock:  # a cancelled answer may still be inside its last forward pass
            model.close()
