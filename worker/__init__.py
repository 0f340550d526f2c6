"""Celery workers: a study in the spool becomes predictions, a DICOM SR and its delivery."""
