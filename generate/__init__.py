"""`python -m generate`: see generate/__main__.py."""
