"""The language model's own commands beside `dlops train lm`: text from a checkpoint, and from the
served model over HTTP (the LM's shorthand for `dlops predict --model lm`); and `dlops data
synth-corpus`, a learnable corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from serving.handlers.request_fields import GENERATION_FIELDS, MIN_TEMPERATURE
from serving.handlers.request_fields import click_options as generation_field_options
from training.clitools import CHECKPOINT, client_options, server_client, show_answer

SERVED_AS = "lm"  # the served model's name: /predictions/lm


@click.command("generate")
@click.option("--checkpoint", required=True, type=CHECKPOINT, help="a checkpoint file or a model URI")
@click.option("--prompt", default="", help="text to continue; words outside the vocabulary become <unk>")
@click.option("--words", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=MIN_TEMPERATURE), default=1.0, show_default=True,
              help="higher is more diverse")  # fmt: skip
@click.option("--seed", type=int, default=1111, show_default=True)
@click.option(
    "--outf", type=click.Path(dir_okay=False, path_type=Path), default=Path("generated.txt"), show_default=True
)
@click.option("--log-interval", type=click.IntRange(0), default=100, show_default=True)
@click.option("--device", default="cpu", show_default=True)
def generate_command(checkpoint: str, **options: Any) -> None:
    """Generate text from a language-model checkpoint (written as UTF-8)."""
    from training.jobs.lm.generate import generate

    generate(checkpoint, **options)


@click.command("generate-http")
@client_options
@click.option("--model", default=SERVED_AS, show_default=True, help="the served model's name")
@generation_field_options(GENERATION_FIELDS)  # the server's own request fields, ranges and defaults
def generate_http_command(*, state_dir: Path, inference_port: int | None, url: str | None, key: str | None,
                          key_file: Path | None, ca: Path | None, insecure_http: bool, model: str,
                          **request: Any) -> None:  # fmt: skip
    """Generate text with the served language model (HTTP client)."""
    client = server_client(state_dir=state_dir, inference_port=inference_port, url=url, key=key, key_file=key_file,
                           ca=ca, insecure_http=insecure_http)  # fmt: skip
    show_answer(client.predict_fields(model, {k: v for k, v in request.items() if v is not None}))


@click.command("synth-corpus")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--train-lines", type=click.IntRange(1), default=2000, show_default=True)
@click.option("--valid-lines", type=click.IntRange(1), default=200, show_default=True)
@click.option("--test-lines", type=click.IntRange(1), default=200, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def synth_corpus_command(out: Path, train_lines: int, valid_lines: int, test_lines: int, seed: int) -> None:
    """Write a learnable WikiText-like corpus (train.txt, valid.txt, test.txt) to OUT."""
    from training.jobs.lm.synthetic import write_synthetic_corpus

    write_synthetic_corpus(out, train_lines, valid_lines, test_lines, seed)
    click.echo(f"wrote a corpus of {train_lines}/{valid_lines}/{test_lines} train/valid/test lines to {out}")


DATA_COMMANDS: list[click.Command] = [synth_corpus_command]
COMMANDS: list[click.Command] = [generate_command, generate_http_command]
