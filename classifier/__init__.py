"""Pixels in, probabilities out.  Knows no database, no Celery, no DICOM networking."""
