"""Alignment methods, registered by name. Adding one: a module with a class that subclasses
``relapse.align.erasure.ErasureMethod`` (ESD-like: ``loss(ctx, x_t, t, cond, anchor)``) or
``relapse.align.forgetting.ForgettingMethod`` (LT-like: ``harmful_sample(cfg, z0, eps, centres)``),
registered with ``@METHODS.register(name)``, plus its import here. A method that does not train on the engine
(never-learned) is a registered class with a ``config`` and a classmethod ``run(cfg) -> OUT/final``."""

from relapse.registry import Registry

METHODS: Registry = Registry("alignment method")

from relapse.align import esd, lt, never_learned, ng, resist, sdd  # noqa: E402,F401  (registration)
