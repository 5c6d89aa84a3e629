"""The PST core: layer groups, schedules, freezing, detectors, losses and views. Imports neither deepspeed,
ray nor ffcv."""
