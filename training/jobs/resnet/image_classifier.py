"""TorchServe handler: Tiny-ImageNet ResNet classification with class names.

Runs from inside a .mar, next to `handler_common.py`, `dlops_classifier.py` (a copy of
training/jobs/resnet/classifier.py) and `meta.json`; it needs torch, torchvision and Pillow, not this project.

Request: image bytes (JPEG, PNG, anything Pillow reads) as the raw body or a multipart field
`data`, or JSON {"image": "<base64>", "topk": N}. top-k (default 5) comes from the JSON field, a
multipart field `topk` or the header `X-TopK` (TorchServe 0.12 does not pass query strings such as
`?topk=` on to handlers). Answer: [{"class", "label", "probability"}, ...], best first: "class"
is the class's folder name (the wnid for Tiny-ImageNet), "label" its human-readable name.
"""

from __future__ import annotations

import base64
import binascii
import io
import sys
import warnings

# torchvision imports torch._dynamo, which loads Triton (~90 MB resident per worker) that inference
# never uses: keep it out (measured with bench/serve_load.py; the README's serving notes).
sys.modules.setdefault("triton", None)

import torch  # noqa: E402
from dlops_classifier import build_classifier  # noqa: E402
from handler_common import BadRequest, BaseHandler, form_field, json_object, request_body  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402
from request_fields import Field  # noqa: E402
from torchvision import transforms  # noqa: E402

MAX_PIXELS = 4096 * 4096  # larger images are refused before being decoded (decompression bombs)
DEFAULT_TOPK = 5


class ImageClassifier(BaseHandler):
    mixed_precision = True  # bf16 where the device has it natively: about 1.5x on a CPU with avx512_bf16

    def build_model(self, model_config: dict) -> torch.nn.Module:
        return build_classifier(**model_config)

    def setup(self) -> None:
        size, normalization = self.meta["image_size"], self.meta["normalization"]
        # training/jobs/resnet/data/images.py:eval_transform, restated: the .mar cannot import the project
        self.transform = transforms.Compose(
            [
                transforms.Resize(self.meta.get("resize_size", size)),  # archives of earlier releases: size
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize(normalization["mean"], normalization["std"]),
            ]
        )

    def parse(self, request: dict, headers: dict[str, str]) -> dict:
        """Raw image bytes, a multipart field `data` (+ `topk`), or JSON {"image": base64, "topk": N}."""
        body = request_body(request)
        topk = form_field(request, "topk") or headers.get("x-topk")
        if isinstance(body, dict):
            body = json_object(body)  # refuses NaN and Infinity, naming the field
            if "image" not in body:
                raise BadRequest("JSON body needs an 'image' field holding base64-encoded image bytes")
            try:
                image = base64.b64decode(body["image"], validate=True)
            except (binascii.Error, TypeError) as e:
                raise BadRequest(f"'image' is not valid base64: {e}") from e
            return {"image": image, "topk": body.get("topk", topk)}
        return {"image": body.encode("utf-8") if isinstance(body, str) else body, "topk": topk}

    def prepare(self, fields: dict) -> tuple[torch.Tensor, int]:
        """{"image": bytes, "topk": N (optional)} -> the normalized image and k."""
        unknown = sorted(set(fields) - {"image", "topk"})
        if unknown:
            raise BadRequest(f"unknown field(s) {unknown}; accepted: ['image', 'topk']")
        image = fields.get("image")
        if not image:
            raise BadRequest("empty request body: send the image bytes")
        if not isinstance(image, bytes | bytearray):
            raise BadRequest(f"'image' must hold the image file's bytes, got {type(image).__name__}")
        n_classes = len(self.meta["classes"])
        k = min(DEFAULT_TOPK, n_classes)
        if fields.get("topk") is not None:
            k = Field(name="topk", kind=int, default=k, help="classes to return", low=1, high=n_classes).check(
                fields["topk"]
            )
        return self.transform(open_image(bytes(image))), k

    def infer(self, inputs: list[tuple[torch.Tensor, int]]) -> list[list[dict]]:
        images = torch.stack([image for image, _ in inputs]).to(self.device)
        with self.autocast():
            logits = self.model(images)  # one forward pass for the batch
        probabilities = torch.softmax(logits.float(), dim=1).cpu()
        return [top_k(row, k, self.meta["classes"], self.meta["labels"])
                for row, (_, k) in zip(probabilities, inputs, strict=True)]  # fmt: skip


def top_k(probabilities: torch.Tensor, k: int, classes: list[str], labels: list[str]) -> list[dict]:
    """The k likeliest classes of one image, best first: {"class", "label", "probability"}."""
    values, indices = probabilities.topk(k)
    return [{"class": classes[c], "label": labels[c], "probability": round(float(p), 6)}
            for p, c in zip(values.tolist(), indices.tolist(), strict=True)]  # fmt: skip


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
