"""rawrestore: SID-style restoration of extremely dark RAW captures, built on the `isp` package."""
__version__ = "0.1.0"
