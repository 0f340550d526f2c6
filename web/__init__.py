"""The Flask dashboard, uploads and JSON API."""
