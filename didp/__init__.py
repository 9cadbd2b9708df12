"""Tooling around the Cog predictor: the ``didp`` CLI, the OpenAPI schema and input validation."""
