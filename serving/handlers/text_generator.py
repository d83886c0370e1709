"""TorchServe handler: text generation with a word-level language model.

Runs from inside a .mar, next to `handler_common.py`, `dlops_wordlm.py` (a copy of
training/models/wordlm.py), `meta.json` and `vocab.json`; it needs torch, not this project.

Request: JSON {"prompt": str, "max_words": int, "temperature": float, "seed": int}; every field is
optional (defaults: "", 50, 1.0, random). Limits: max_words 1..MAX_WORDS, temperature in
(0, MAX_TEMPERATURE], prompt up to MAX_PROMPT_CHARS characters.
Answer: {"text": str, "words": int, "unknown_words": [str, ...]}.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from dlops_wordlm import generate_text, lm_from_checkpoint
from handler_common import BadRequest, bounded_float, bounded_int, error_answer, json_object, request_body

MAX_WORDS = 500
MAX_TEMPERATURE = 10.0
MAX_PROMPT_CHARS = 2000
FIELDS = {"prompt", "max_words", "temperature", "seed"}


class TextGenerator:
    def initialize(self, context) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        torch.set_num_threads(int(os.environ.get("DLOPS_TORCH_THREADS", "1")))
        self.meta = json.loads((model_dir / "meta.json").read_text(encoding="utf-8"))
        self.vocab = json.loads((model_dir / "vocab.json").read_text(encoding="utf-8"))
        weights = torch.load(model_dir / context.manifest["model"]["serializedFile"], map_location="cpu",
                             weights_only=True)  # fmt: skip
        self.model = lm_from_checkpoint({"model_config": self.meta["model_config"], "model": weights})
        self.initialized = True

    def parse(self, request: dict) -> dict:
        body = json_object(request_body(request))
        unknown = sorted(set(body) - FIELDS)
        if unknown:
            raise BadRequest(f"unknown field(s) {unknown}; accepted: {sorted(FIELDS)}")
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise BadRequest(f"'prompt' must be a string, got {json.dumps(prompt)}")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest(f"'prompt' is longer than {MAX_PROMPT_CHARS} characters")
        return {
            "prompt": prompt,
            "n_words": bounded_int(body.get("max_words", 50), "max_words", 1, MAX_WORDS),
            "temperature": bounded_float(body.get("temperature", 1.0), "temperature", 0.0, MAX_TEMPERATURE, True),
            "seed": bounded_int(body.get("seed", random.randrange(2**31)), "seed", 0, 2**63 - 1),
        }

    def handle(self, data: list[dict], context) -> list:
        answers = []
        for i, request in enumerate(data):
            try:
                options = self.parse(request)
                answers.append(generate_text(self.model, self.vocab, window=self.meta["window"], **options))
            except Exception as e:  # any bad input answers that request only
                answers.append(error_answer(context, i, e))
        return answers
