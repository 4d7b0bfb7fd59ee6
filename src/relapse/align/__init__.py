"""Safety alignment methods, registered by name. Adding one: a module with a class that has
``setup(ctx)``, ``loss(ctx, x_t, t, cond, uncond)`` and ``after_step(ctx)``, plus its import here."""

from relapse.registry import Registry

METHODS: Registry = Registry("alignment method")

from relapse.align import esd, sdd  # noqa: E402,F401  (registration)
