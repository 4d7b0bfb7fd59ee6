"""Third-party notices that say nothing to a relapse user, filtered where they arise, one by one (never
a blanket silence: every other warning still reaches the user).

- transformers: "`CLIPImageProcessor` requires torchvision (not installed); falling back to
  `CLIPImageProcessorPil`": relapse never uses torchvision (it does not install beside the CPU torch
  wheel), and the PIL fallback is what it wants.
- transformers: "The new embeddings will be initialized from a multivariate normal distribution": diffusers'
  ``load_textual_inversion`` grows the text encoder by a row and then writes the learned embedding into it, so how
  the row was first filled never matters.
- peft: "Already found a `peft_config` attribute in the model. This will lead to having multiple
  adapters": relapse attaches a fine-tuning LoRA beside a safety LoRA on purpose (Modular LoRA).

peft's warning that a LoRA file's config and its weights disagree is *not* filtered: it once revealed
that a saved safety LoRA lost its self-attention weights at load.
"""

from __future__ import annotations

import logging
import warnings

# (logger name, a phrase of the message): records of that logger whose message holds the phrase are dropped.
FILTERED = [("transformers.utils.import_utils", "requires torchvision (not installed)"),
            ("transformers.modeling_utils", "The new embeddings will be initialized from a multivariate normal")]


class _Drop(logging.Filter):
    def __init__(self, phrase: str):
        super().__init__()
        self.phrase = phrase

    def filter(self, record: logging.LogRecord) -> bool:
        return self.phrase not in record.getMessage()


# (category, the start of the message, the module that warns): Python warnings dropped.
FILTERED_WARNINGS = [(UserWarning, "Already found a `peft_config` attribute", r"peft\.tuners\.tuners_utils")]


def install() -> None:
    """Attach the filters to their loggers and to the warnings machinery (idempotent; both are process-wide,
    so this may run before the library that logs or warns is imported)."""
    for name, phrase in FILTERED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.phrase == phrase for f in logger.filters):
            logger.addFilter(_Drop(phrase))
    for category, message, module in FILTERED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
