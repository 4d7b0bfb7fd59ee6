"""Fine-tune methods, registered by name. Adding one: a module with a class that subclasses
``relapse.finetuning.base.FinetuneMethod`` (it chooses what trains), registered with
``@METHODS.register(name)``, plus its import here."""

from relapse.registry import Registry

METHODS: Registry = Registry("fine-tune method")

from relapse.finetuning import methods  # noqa: E402,F401  (registration)
