"""TorchServe handler: text generation with a word-level language model, a batch at a time.

Runs from inside a .mar, next to `handler_common.py`, `request_fields.py`, `dlops_wordlm.py` (a
copy of training/jobs/lm/wordlm.py) and `meta.json` (model config, vocabulary, window); it needs
torch, not this project.

Request: a JSON object with the fields of request_fields.GENERATION_FIELDS (prompt, max_words,
temperature, seed; each optional). Answer: {"text": str, "words": int, "unknown_words": [str, ...]}.
All requests of a TorchServe batch are sampled together, one forward pass per step for the whole
batch; each draws from its own seeded generator, so its text does not depend on its neighbours.

What the prediction log and the drift check keep of a request (summarize): the prompt's length in
words and the share of them outside the vocabulary (text in another language, or of another
field, shows there first), the mean word length; and how many words were generated.
"""

from __future__ import annotations

import torch
from dlops_wordlm import build_language_model, generate_batch
from handler_common import BaseHandler
from request_fields import GENERATION_FIELDS, validate


class TextGenerator(BaseHandler):
    def build_model(self, model_config: dict) -> torch.nn.Module:
        return build_language_model(**model_config)

    def prepare(self, fields: dict) -> dict:
        """The request's fields (a JSON object over HTTP, a row in MLflow), checked and defaulted."""
        fields = validate(fields, GENERATION_FIELDS)
        return {"prompt": fields["prompt"], "n_words": fields["max_words"], "temperature": fields["temperature"],
                "seed": fields["seed"]}  # fmt: skip

    def infer(self, inputs: list[dict]) -> list[dict]:
        return generate_batch(self.model, self.meta["vocab"], inputs, self.meta["window"])

    def summarize(self, inputs: list[dict], answers: list[dict]) -> list[dict]:
        summaries = []
        for request, answer in zip(inputs, answers, strict=True):
            words = request["prompt"].split()
            outside = set(answer["unknown_words"])
            unknown = sum(1 for w in words if w in outside)
            summary = {"prompt_words": len(words), "unknown_share": round(unknown / len(words), 4) if words else 0.0,
                       "mean_word_length": round(sum(map(len, words)) / len(words), 3) if words else 0.0}  # fmt: skip
            summaries.append({"input": summary, "answer": {"words": answer["words"]}})
        return summaries
