"""Coverage-guided fuzz harnesses (atheris), run by hand; not part of ``make test``."""
