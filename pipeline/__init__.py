"""The Cog-free pipeline under every entry point: requests, runs, their files and their limits."""
