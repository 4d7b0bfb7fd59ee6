"""Safety alignment methods, registered by name. Adding one: a module with a class that has
``setup(ctx)``, ``loss(ctx, x_t, t, cond, anchor)`` (anchor: the empty prompt's encoding unless ``--anchor strip``) and ``after_step(ctx)``, plus its import here."""

from relapse.registry import Registry

METHODS: Registry = Registry("alignment method")

from relapse.align import esd, sdd  # noqa: E402,F401  (registration)
