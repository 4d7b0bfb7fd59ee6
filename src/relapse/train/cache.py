"""Content-addressed cache of what the frozen VAE and text encoder make of a dataset.

The key hashes the dataset's images and captions and the VAE's and text encoders' weights, so repeated
fine-tunes over the same data (step sweeps, seeds, defenses) never re-encode it, and a changed
encoder or dataset can never hit a stale entry. Entries are safetensors, written atomically.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from relapse.data.datasets import CaptionedImages
from relapse.models.families import family_of
from relapse.models.pipeline_utils import images_to_tensor, weights_fingerprint

TEXT = "text."  # the conditioning's tensors are stored as text.<name>


def default_cache_dir() -> Path:
    return Path(os.environ.get("RELAPSE_CACHE", Path.home() / ".cache" / "relapse"))


def cache_key(data: CaptionedImages, pipe) -> str:
    family = family_of(pipe)
    parts = [data.fingerprint, type(family).__name__, weights_fingerprint(pipe.vae),
             *[weights_fingerprint(encoder) for encoder in family.text_encoders()], str(pipe.tokenizer.model_max_length)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


@torch.no_grad()
def encode_dataset(data: CaptionedImages, pipe, batch: int = 64) -> dict[str, torch.Tensor]:
    family = family_of(pipe)
    means, stds, texts = [], [], []
    for i in range(0, len(data.images), batch):
        x = images_to_tensor(data.images[i : i + batch])
        dist = pipe.vae.encode(x.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu()), stds.append(dist.std.float().cpu())
        texts.append(family.encode(data.captions[i : i + batch]))
    # Contiguous, as a cache hit loads them: the VAE may hand back channels-last strides, which send
    # the UNet's convolutions down another kernel and make a miss and a hit train differently.
    text = {TEXT + name: torch.cat([t[name] for t in texts]).float().cpu().contiguous() for name in texts[0]}
    return {"latent_mean": torch.cat(means).contiguous(), "latent_std": torch.cat(stds).contiguous()} | text


def text_of(encodings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The conditioning part of cached encodings, keyed as the family's ``encode`` keys it."""
    return {name.removeprefix(TEXT): tensor for name, tensor in encodings.items() if name.startswith(TEXT)}


def cached_encodings(data: CaptionedImages, pipe, cache_dir: Path | None = None) -> tuple[dict[str, torch.Tensor], bool]:
    """The encodings of ``data`` and whether they came from the cache."""
    from safetensors.torch import load_file, save_file

    path = (cache_dir or default_cache_dir()) / "encodings" / f"{cache_key(data, pipe)}.safetensors"
    if path.is_file():
        return load_file(path), True
    encodings = encode_dataset(data, pipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(encodings, tmp)
    tmp.replace(path)
    return encodings, False
