"""Model families, registered by name: what a pipeline class trains (a UNet or a transformer), how it encodes prompts,
how its denoiser is called, and what it predicts. Every trainer reaches the model through :func:`family_of`, so the
methods are written once for SD 1.x/2.x, SDXL, SD 3.x and FLUX.1. Adding one: a module with a :class:`Family`
subclass registered with ``@FAMILIES.register(name)``, plus its import here."""

from relapse.registry import Registry

FAMILIES: Registry = Registry("model family")

from relapse.models.families import flux, sd, sd3, sdxl  # noqa: E402,F401  (registration)
from relapse.models.families.base import Family, family_of  # noqa: E402,F401
