"""TorchServe handler: Tiny-ImageNet ResNet classification with class names.

Runs from inside a .mar, next to `handler_common.py`, `dlops_classifier.py` (a copy of
training/jobs/resnet/classifier.py) and `meta.json`; it needs torch, torchvision and Pillow, not this project.

Request: image bytes (JPEG, PNG, anything Pillow reads) as the raw body or a multipart field
`data`, or JSON {"image": "<base64>", "topk": N}. top-k (default 5) comes from the JSON field, a
multipart field `topk` or the header `X-TopK` (TorchServe 0.12 does not pass query strings such as
`?topk=` on to handlers). Answer: [{"class", "label", "probability"}, ...], best first: "class"
is the class's folder name (the wnid for Tiny-ImageNet), "label" its human-readable name.

What the prediction log and the drift check keep of a request (summarize): the image's size, its
colours' mean and spread per channel as the model sees them (normalized), its edges' direction
(log of horizontal over vertical change: photos turned on their side flip its sign), and the
model's penultimate-layer embedding projected onto EMBEDDING_DIMS fixed random directions (a few
numbers rather than 512, with distances kept: the Johnson-Lindenstrauss projection); and the top class.
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
EMBEDDING_DIMS = 16
CHANNELS = ("r", "g", "b")


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
        self.embeddings: torch.Tensor | None = None
        # the penultimate layer is the input of the last Linear (ResNet's fc, other models' classifier)
        last_linear = [module for module in self.model.modules() if isinstance(module, torch.nn.Linear)][-1]
        last_linear.register_forward_pre_hook(self._keep_embeddings)
        seeded = torch.Generator().manual_seed(0)  # the same directions in every worker and profile
        self.projection = torch.randn(last_linear.in_features, EMBEDDING_DIMS, generator=seeded) / EMBEDDING_DIMS**0.5

    def _keep_embeddings(self, module: torch.nn.Module, args: tuple) -> None:
        self.embeddings = args[0].detach().float().cpu() if self.summarizing else None

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

    def prepare(self, fields: dict) -> tuple[torch.Tensor, int, tuple[int, int]]:
        """{"image": bytes, "topk": N (optional)} -> the normalized image, k and the image's size."""
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
        picture = open_image(bytes(image))
        return self.transform(picture), k, picture.size

    def infer(self, inputs: list[tuple[torch.Tensor, int, tuple[int, int]]]) -> list[list[dict]]:
        images = torch.stack([image for image, _, _ in inputs]).to(self.device)
        with self.autocast():
            logits = self.model(images)  # one forward pass for the batch
        probabilities = torch.softmax(logits.float(), dim=1).cpu()
        return [top_k(row, k, self.meta["classes"], self.meta["labels"])
                for row, (_, k, _) in zip(probabilities, inputs, strict=True)]  # fmt: skip

    def summarize(self, inputs: list, answers: list) -> list[dict]:
        embeddings = self.embeddings
        if embeddings is not None and len(embeddings) != len(inputs):  # answered one by one after a failure
            embeddings = None
        projected = (embeddings @ self.projection).tolist() if embeddings is not None else [None] * len(inputs)
        summaries = []
        for (image, _, (width, height)), answer, embedding in zip(inputs, answers, projected, strict=True):
            means, spreads = image.mean(dim=(1, 2)).tolist(), image.std(dim=(1, 2)).tolist()
            summary = {"width": width, "height": height}
            summary |= {f"mean_{c}": round(m, 4) for c, m in zip(CHANNELS, means, strict=True)}
            summary |= {f"std_{c}": round(v, 4) for c, v in zip(CHANNELS, spreads, strict=True)}
            summary["edges"] = round(edge_direction(image), 4)
            if embedding is not None:
                summary["embedding"] = [round(x, 4) for x in embedding]
            summaries.append({"input": summary, "answer": {"class": answer[0]["class"],
                                                           "probability": answer[0]["probability"]}})  # fmt: skip
        return summaries


def edge_direction(image: torch.Tensor) -> float:
    """log(mean horizontal change / mean vertical change) of the image's gray levels: 0 for no preferred
    direction; a quarter turn flips its sign."""
    gray = image.mean(dim=0)
    across = (gray[:, 1:] - gray[:, :-1]).abs().mean()
    down = (gray[1:, :] - gray[:-1, :]).abs().mean()
    return float(torch.log((across + 1e-6) / (down + 1e-6)))


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
