"""Attacks on an aligned model that are not fine-tuning: adversarial prompts."""
