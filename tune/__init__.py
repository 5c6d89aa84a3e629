"""Ray Tune search over PST schedules: a thin driver over ``pst_dist`` (the only package that imports Ray)."""
