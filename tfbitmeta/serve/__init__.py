"""Fallback inference server: TF-Serving-shaped REST API over the exported backend files (``tfbitmeta serve``)."""
