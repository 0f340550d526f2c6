"""The outbox's error: a destination did not take what was sent (network, association, HTTP
or DICOM status), with the reason in words; stored as the delivery's last error."""


class DeliveryError(Exception):
    """The destination did not take the report (network, association or status)."""
