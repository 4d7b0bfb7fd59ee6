"""``relapse review RUN``: draw the blind sample, then serve the labelling page, write contact sheets, or move labels
in or out as CSV."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from relapse.errors import UserError
from relapse.review.labels import LabelStore
from relapse.review.sample import LABELS_FILE, REVIEW_DIR, SampleConfig, draw_sample


class ReviewConfig(SampleConfig):
    run: Path = Field(description="a folder written by `relapse study`")
    host: str = Field("127.0.0.1", description="address the page is served on (another machine reaches it only if you "
                                               "say so: 0.0.0.0)")
    port: int = Field(8765, ge=1, le=65535, description="port the page is served on")
    labeller: str | None = Field(None, description="who labelled the rows of --import that name no labeller")
    import_csv: Path | None = Field(None, description="add the labels of this CSV (columns token or image, label, labeller)")
    export_csv: Path | None = Field(None, description="write every current label to this CSV")
    sheets: Path | None = Field(None, description="write the sample as numbered contact sheets (PNG) and labels.csv here")
    per_sheet: int = Field(48, ge=1, description="images per contact sheet")

    @property
    def adds_labels(self) -> bool:
        """Whether this run of the command can change the labels (an import, or the page)."""
        return self.import_csv is not None or not (self.export_csv or self.sheets)


def run_review(cfg: ReviewConfig) -> str:
    """Do what the config asks (import, export, sheets; else serve until Ctrl-C); one line saying what was done."""
    if not cfg.run.is_dir():
        raise UserError(f"{cfg.run} is not a folder; give the run folder of a `relapse study`")
    sample = draw_sample(cfg.run, SampleConfig(**cfg.model_dump(include=set(SampleConfig.model_fields))))
    store = LabelStore(cfg.run / REVIEW_DIR / LABELS_FILE)
    done = []
    if cfg.import_csv:
        from relapse.review.sheets import import_csv

        done.append(f"imported {import_csv(store, sample, cfg.import_csv, cfg.labeller)} labels from {cfg.import_csv}")
    if cfg.export_csv:
        done.append(f"exported {store.export_csv(cfg.export_csv, sample.tokens)} labels to {cfg.export_csv}")
    if cfg.sheets:
        from relapse.review.sheets import write_sheets

        sheets = write_sheets(cfg.run, sample, cfg.sheets, cfg.per_sheet)
        done.append(f"wrote {len(sample.images)} images on {sheets} sheets and labels.csv to {cfg.sheets}")
    if done:
        return "; ".join(done)
    from relapse.review.server import serve

    print(f"labelling {len(sample.images)} images of {len(sample.cells)} cells at http://{cfg.host}:{cfg.port} (Ctrl-C stops)")
    serve(cfg.run, sample, store, cfg.host, cfg.port)
    return f"labels in {store.path}"
