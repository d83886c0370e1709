"""TorchServe handler: Tiny-ImageNet ResNet classification with class names.

Runs from inside a .mar, next to `handler_common.py`, `dlops_resnet.py` (a copy of
training/models/resnet.py) and `meta.json`; it needs torch, torchvision and Pillow, not this project.

Request: image bytes (JPEG, PNG, anything Pillow reads) as the raw body or a multipart field
`data`, or JSON {"image": "<base64>", "topk": N}. top-k (default 5) comes from the JSON field, a
multipart field `topk` or the header `X-TopK` (TorchServe 0.12 does not pass query strings such as
`?topk=` on to handlers). Answer: [{"wnid", "label", "probability"}, ...], best first.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import warnings
from pathlib import Path

import torch
from dlops_resnet import build_resnet
from handler_common import BadRequest, bounded_int, error_answer, form_field, request_body
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

MAX_PIXELS = 4096 * 4096  # larger images are refused before being decoded (decompression bombs)
DEFAULT_TOPK = 5


class ImageClassifier:
    def initialize(self, context) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        torch.set_num_threads(int(os.environ.get("DLOPS_TORCH_THREADS", "1")))
        self.meta = json.loads((model_dir / "meta.json").read_text(encoding="utf-8"))
        weights = torch.load(model_dir / context.manifest["model"]["serializedFile"], map_location="cpu",
                             weights_only=True)  # fmt: skip
        self.model = build_resnet(self.meta["arch"], len(self.meta["classes"]), self.meta["stem"])
        self.model.load_state_dict(weights)
        self.model.eval()
        size = self.meta["image_size"]
        # training/data/images.py:eval_transform, restated: the .mar cannot import the project
        self.transform = transforms.Compose(
            [
                transforms.Resize(size),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize(self.meta["mean"], self.meta["std"]),
            ]
        )
        self.initialized = True

    def decode(self, request: dict, headers: dict[str, str]) -> tuple[torch.Tensor, int]:
        body = request_body(request)
        topk = form_field(request, "topk") or headers.get("x-topk")
        if isinstance(body, dict):
            if "image" not in body:
                raise BadRequest("JSON body needs an 'image' field holding base64-encoded image bytes")
            topk = body.get("topk", topk)
            try:
                body = base64.b64decode(body["image"], validate=True)
            except (binascii.Error, TypeError) as e:
                raise BadRequest(f"'image' is not valid base64: {e}") from e
        if isinstance(body, str):
            body = body.encode("utf-8")
        if not body:
            raise BadRequest("empty request body: send the image bytes")
        n_classes = len(self.meta["classes"])
        k = min(DEFAULT_TOPK, n_classes) if topk is None else bounded_int(topk, "topk", 1, n_classes)
        return self.transform(open_image(bytes(body))), k

    @torch.no_grad()
    def handle(self, data: list[dict], context) -> list:
        answers: list = [None] * len(data)
        images, topks, indices = [], [], []
        for i, request in enumerate(data):
            try:
                headers = {k.lower(): v for k, v in context.get_all_request_header(i).items() if isinstance(v, str)}
                image, k = self.decode(request, headers)
            except Exception as e:  # any bad input answers that request only
                answers[i] = error_answer(context, i, e)
                continue
            images.append(image)
            topks.append(k)
            indices.append(i)
        if images:  # one forward pass for the whole batch
            probabilities = torch.softmax(self.model(torch.stack(images)), dim=1)
            for row, i, k in zip(probabilities, indices, topks, strict=True):
                values, classes = row.topk(k)
                answers[i] = [
                    {
                        "wnid": self.meta["classes"][c],
                        "label": self.meta["labels"][c],
                        "probability": round(float(p), 6),
                    }
                    for p, c in zip(values.tolist(), classes.tolist(), strict=True)
                ]
        return answers


def open_image(raw: bytes) -> Image.Image:
    """Decode to RGB with Pillow; refuse non-images, truncated files and decompression bombs."""
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise Image.DecompressionBombError("")
                image.load()
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadRequest(f"image too large: at most {MAX_PIXELS} pixels are accepted", status=413) from e
    except UnidentifiedImageError as e:
        raise BadRequest("body is not an image Pillow can read (JPEG, PNG, ...)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadRequest(f"image data is truncated or corrupt: {e}") from e
