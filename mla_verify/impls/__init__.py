"""The project's own decode-kernel implementations."""
