"""CLIP loading and embeddings shared by the CLIP-based detectors (q16, laion_nsfw, laion_aesthetic, clip_score).

Everything comes from local paths the user names: a transformers CLIP folder (``save_pretrained`` of e.g.
``openai/clip-vit-large-patch14``: config.json, model.safetensors, preprocessor_config.json and the
tokenizer files) and small heads as .safetensors files. Nothing downloads, nothing is unpickled. Detectors
that name the same CLIP folder share one model in memory.

Example::

    clip = load_clip("weights/clip-vit-large-patch14", "q16")
    emb = image_embeddings(clip, images)  # (N, 768), unit length
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from relapse.errors import UserError

PICKLE_SUFFIXES = (".pth", ".pt", ".p", ".pkl", ".pickle", ".bin", ".ckpt")
# The one-line conversion of a pickled state dict (.pth) to safetensors, for heads stored as plain state dicts.
CONVERT_STATE_DICT = ("python -c \"import torch; from safetensors.torch import save_file; "
                      "save_file({{k: v.contiguous() for k, v in torch.load('{src}', weights_only=True).items()}}, '{dst}')\"")
CLIP_CONTENTS = ("a transformers CLIP model saved with save_pretrained (config.json, model.safetensors, "
                 "preprocessor_config.json, tokenizer files), e.g. openai/clip-vit-large-patch14")


@dataclass
class Clip:
    model: object  # transformers CLIPModel, eval mode, on ``device``
    image_processor: object
    tokenizer: object | None
    device: str
    batch_size: int

    @property
    def dim(self) -> int:
        """Width of the joint image-text embedding (768 for ViT-L/14)."""
        return int(self.model.config.projection_dim)


def clip_dim(folder: str | Path | None, detector: str) -> int:
    """The embedding width of the CLIP in ``folder``, read from its config alone (to check heads before
    the weights load)."""
    from transformers import CLIPConfig

    folder = check_clip_folder(folder, detector)
    try:
        return int(CLIPConfig.from_pretrained(folder, local_files_only=True).projection_dim)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"CLIP folder {folder} has an unreadable config.json ({type(exc).__name__}); it should hold "
                        f"{CLIP_CONTENTS}") from None


def check_clip_folder(folder: str | Path | None, detector: str) -> Path:
    if not folder:
        raise UserError(f"the {detector} detector needs the option clip=DIR: a local folder with {CLIP_CONTENTS}")
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"CLIP folder {folder} not found; it should hold {CLIP_CONTENTS}")
    if not (folder / "config.json").is_file():
        raise UserError(f"CLIP folder {folder} has no config.json; it should hold {CLIP_CONTENTS}")
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError):
        model_type = "unreadable"
    if model_type != "clip":
        raise UserError(f"CLIP folder {folder} holds a {model_type!r} model, not a CLIP (config.json model_type); "
                        f"it should hold {CLIP_CONTENTS}")
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"CLIP folder {folder} has no .safetensors weights (we never unpickle .bin files); convert once "
                        f"with: python -c \"from transformers import CLIPModel; CLIPModel.from_pretrained('{folder}')"
                        f".save_pretrained('{folder}', safe_serialization=True)\"")
    return folder


def pick_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=2)
def shared_clip_model(folder: str, device: str):
    """One CLIPModel per folder and device: q16, clip_score and laion_aesthetic in one study share it
    (three ViT-L/14 copies would hold 5 GB). Inference only, so sharing is safe."""
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval().to(device)


def load_clip(folder: str | Path | None, detector: str, *, text: bool = False, device: str | None = None, batch_size: int = 32) -> Clip:
    """A CLIPModel, its image processor and (``text=True``) its tokenizer, all from ``folder`` with
    ``local_files_only=True`` and safetensors weights only."""
    from transformers import AutoTokenizer, CLIPImageProcessor

    folder = check_clip_folder(folder, detector)
    if batch_size < 1:
        raise UserError(f"{detector} batch_size must be at least 1, got {batch_size}")
    device = pick_device(device)
    what = "model weights"
    try:
        model = shared_clip_model(str(folder.resolve()), device)
        what = "preprocessor_config.json"
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        what = "tokenizer files"
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True) if text else None
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
        raise UserError(f"CLIP folder {folder}: could not load its {what} ({type(exc).__name__}); it should hold "
                        f"{CLIP_CONTENTS}") from None
    return Clip(model, processor, tokenizer, device, batch_size)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class ClipFeatures:
    """A CLIP detector's image features for a Frechet distance (FD_CLIP): the unit-length image embeddings."""

    clip: Clip

    def features(self, images: np.ndarray) -> np.ndarray:
        return image_embeddings(self.clip, images).double().numpy()


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def image_embeddings(clip: Clip, images: np.ndarray):
    """(N, D) float32 CPU tensor of unit-length CLIP image embeddings (the projected pooled output, as
    ``get_image_features``) of uint8 images (N, H, W, 3)."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(images), clip.batch_size):
            batch = [np.asarray(image) for image in images[start:start + clip.batch_size]]
            pixels = clip.image_processor(images=batch, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
            pixels = pixels.to(clip.device, dtype=clip.model.dtype)
            pooled = clip.model.vision_model(pixel_values=pixels).pooler_output
            out.append(_unit(clip.model.visual_projection(pooled).float()).cpu())
    return torch.cat(out) if out else torch.zeros(0, clip.dim)


def text_embeddings(clip: Clip, texts: list[str]):
    """(N, D) float32 CPU tensor of unit-length CLIP text embeddings; texts longer than the text tower's
    context (77 tokens for CLIP) are truncated, as every CLIP-score implementation does."""
    import torch

    if clip.tokenizer is None:
        raise ValueError("load_clip(..., text=True) is needed for text embeddings")
    limit = min(int(clip.tokenizer.model_max_length), int(clip.model.config.text_config.max_position_embeddings))
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), clip.batch_size):
            tokens = clip.tokenizer(list(texts[start:start + clip.batch_size]), padding=True, truncation=True,
                                    max_length=limit, return_tensors="pt")
            pooled = clip.model.text_model(input_ids=tokens["input_ids"].to(clip.device),
                                           attention_mask=tokens["attention_mask"].to(clip.device)).pooler_output
            out.append(_unit(clip.model.text_projection(pooled).float()).cpu())
    return torch.cat(out) if out else torch.zeros(0, clip.dim)


def load_head(path: str | Path | None, detector: str, option: str, contents: str, convert: str,
              shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """Tensors of a .safetensors head file, checked against ``shapes`` (exact keys and shapes) when given.

    ``contents`` says what the file should hold; ``convert`` is the one-line command that turns the
    peers' pickled file into this one ({src} and {dst} are filled in)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path:
        raise UserError(f"the {detector} detector needs the option {option}=FILE: a .safetensors file holding {contents}")
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        dst = path.with_suffix(".safetensors")
        raise UserError(f"{option} file {path} is a pickle and we never unpickle; convert it once with: "
                        f"{convert.format(src=path, dst=dst)} and pass {option}={dst}")
    if not path.is_file():
        raise UserError(f"{option} file {path} not found; it should be a .safetensors file holding {contents}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{option} file {path} is not a readable .safetensors file ({first_line(exc)}); it should hold {contents}") from None
    if shapes is not None:
        got = {key: tuple(value.shape) for key, value in tensors.items()}
        if got != shapes:
            problems = []
            if missing := sorted(shapes.keys() - got.keys()):
                problems.append(f"missing {', '.join(missing)}")
            if extra := sorted(got.keys() - shapes.keys()):
                problems.append(f"unexpected {', '.join(extra)}")
            if wrong := [f"{k} {got[k]} (want {shapes[k]})" for k in sorted(shapes.keys() & got.keys()) if got[k] != shapes[k]]:
                problems.append(f"wrong shape {'; '.join(wrong)}")
            raise UserError(f"{option} file {path} does not match: {'; '.join(problems)}; it should hold {contents}")
    return {key: value.float() for key, value in tensors.items()}
