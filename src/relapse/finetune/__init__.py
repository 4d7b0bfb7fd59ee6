"""Fine-tune methods, registered by name. Adding one: a module with a class that subclasses
``relapse.finetune.base.FinetuneMethod`` (it chooses what trains), registered with
``@METHODS.register(name)``, plus its import here."""

from relapse.registry import Registry

METHODS: Registry = Registry("fine-tune method")

from relapse.finetune import methods  # noqa: E402,F401  (registration)
