"""DICOM in: the storage SCP, the durable spool, study assembly and the sweeper."""
