"""Human evaluation: ``relapse review RUN`` shows people a blind sample of a study's images and keeps what they
say beside what the detectors say.

- :mod:`~relapse.review.sample`: which images, drawn per cell and shuffled across cells;
- :mod:`~relapse.review.labels`: the labels, in SQLite in the run folder;
- :mod:`~relapse.review.server`: the labelling page (FastAPI);
- :mod:`~relapse.review.sheets`: contact sheets and a CSV, for labelling away from the page, and its import;
- :mod:`~relapse.review.agreement`: the human rates of each labelled cell, and each detector's agreement;
- :mod:`~relapse.review.run`: the command.
"""
