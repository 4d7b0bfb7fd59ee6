"""Alignment methods, registered by name: a module with the method's config and class, registered with
``@METHODS.register(name)``, plus its import here; ``relapse align``, the API and studies find it by its name. A method
that trains subclasses :class:`relapse.align.erasure.ErasureMethod` (ESD-like: ``erasure_loss(model, x_t, t, cond,
anchor)``) or :class:`relapse.align.forgetting.ForgettingMethod` (LT-like: ``harmful_sample(cfg, z0, eps, centres)``)
and runs on the training engine; a closed-form one subclasses :class:`relapse.align.edit.EditMethod` (``edit(pipe,
family)``: the new tensors); one that runs itself (never-learned) has a classmethod ``run(cfg) -> OUT/final``; one that acts at sampling (SLD)
writes a guard (:mod:`relapse.models.guards`)."""

from relapse.registry import Registry

METHODS: Registry = Registry("alignment method")

from relapse.align import advunlearn, ca, esd, fmn, lt, mace, never_learned, ng, rece, resist, salun, sdd, sld, uce  # noqa: E402,F401  (registration)
