"""A concept named by prompts, and what each of its prompts is steered toward: the fields every erasure method shares,
whether it trains (ESD, SDD, Resist) or computes its edit (UCE)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from relapse.data.prompts import replace_words


class NamedConcept(BaseModel):
    concept: list[str] = Field(default_factory=list, description="prompts that name the concept to erase")
    concept_prompts: str | None = Field(None, description="a prompt file (or toy:NAME) whose prompts also name it")
    anchor: Literal["empty", "strip"] = Field(
        "empty", description="what the concept is steered toward: the empty prompt (ESD, SDD and UCE's nudity erasure as "
                             "published) or, per concept prompt, the same prompt with the --concept words stripped")

    @model_validator(mode="after")
    def _names_a_concept(self) -> NamedConcept:
        if not self.concept and not self.concept_prompts:
            raise ValueError("name the concept to erase with --concept (repeatable) or --concept-prompts FILE")
        return self

    def concept_texts(self) -> list[str]:
        from relapse.data.prompts import read_prompts

        extra = [p.text for p in read_prompts(self.concept_prompts)] if self.concept_prompts else []
        return self.concept + extra

    def anchor_texts(self, texts: list[str] | None = None) -> list[str]:
        """One anchor per concept prompt (``texts``, default ``concept_texts()``). "strip" keeps everything
        the prompt says but the concept (the anchor of "a checkered red star" is "a red star"), so erasing
        it spares shape and colour."""
        texts = self.concept_texts() if texts is None else texts
        if self.anchor == "empty":
            return [""] * len(texts)
        return [replace_words(text, self.concept) for text in texts]
