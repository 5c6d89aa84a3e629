"""pst-dist: Progressive Staged Training against unlearnable examples."""
__version__ = "0.1.0"
