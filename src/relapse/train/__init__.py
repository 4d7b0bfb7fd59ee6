"""Training: the one engine every method runs on (:mod:`relapse.train.engine`) and what it makes
(:mod:`relapse.train.module`)."""
