"""Our analytic variances inside diffusers pipelines (:mod:`.scheduler`)."""
