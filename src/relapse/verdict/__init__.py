"""Decide: a verdict on a third-party LoRA (``relapse audit``)."""
