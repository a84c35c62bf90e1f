"""RAW pair data: SID/ELD manifests, datasets and synthetic data."""
