"""Command-line tools: the ``didp`` command, Cog's schema file and the README's inputs table."""
