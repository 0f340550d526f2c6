"""``covidct demo``: send three CT studies to a running covidct over real C-STORE.

The studies are made here, not copied from any dataset, and each shows one outcome:

1. a drawn chest with multifocal ground glass at the periphery of both lungs (as typical
   COVID-19 pneumonia looks), with a localizer and a derived series that the worker leaves out:
   expect Present;
2. the same chest, clear: expect Absent;
3. one slice (pydicom's bundled ``CT_small.dcm``, given fresh UIDs): not analysable, with the
   reason (too few slices to segment lungs).

``--studies N`` sends N studies, repeating the first two recipes, and the one-slice study last.
"""

from __future__ import annotations

import logging

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE

from core.settings import Settings
from covidct.synthetic import ROOT, SeriesSpec, make_study

logger = logging.getLogger(__name__)


def demo_studies(count: int) -> list[list[pydicom.Dataset]]:
    """``count`` studies: the last is the one-slice study, the others the two chests."""
    recipes = [
        (
            "Demo^GroundGlass",
            "Demo: drawn chest, multifocal ground glass",
            [
                SeriesSpec(slices=40, ground_glass=True, multifocal=True),
                SeriesSpec(kind="localizer"),
                SeriesSpec(slices=8, kind="derived"),
            ],
        ),
        (
            "Demo^Clear",
            "Demo: drawn chest, clear lungs",
            [SeriesSpec(slices=40), SeriesSpec(kind="localizer")],
        ),
    ]
    studies = []
    for i in range(max(0, count - 1)):
        name, description, series = recipes[i % len(recipes)]
        study = make_study(
            series,
            patient_name=name,
            patient_id=f"DEMO{i + 1:03d}",
            accession=f"DEMO{i + 1:05d}",
            seed=100 + i,
        )
        for ds in study:
            ds.StudyDescription = description
        studies.append(study)
    if count >= 1:
        studies.append([_pydicom_ct()])
    return studies


def _pydicom_ct() -> pydicom.Dataset:
    """pydicom's bundled CT slice, given fresh UIDs so each demo run is a new study."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = generate_uid(prefix=ROOT)
    ds.SeriesInstanceUID = generate_uid(prefix=ROOT)
    ds.SOPInstanceUID = generate_uid(prefix=ROOT)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID = "Demo^PydicomCT", "DEMOPYD"
    ds.StudyDescription = "Demo: one CT slice (pydicom's CT_small), not a chest series"
    return ds


def run_demo(settings: Settings, *, studies: int = 3) -> int:
    ae = AE(ae_title="DEMO_SCU")
    sop_classes = {"1.2.840.10008.5.1.4.1.1.2"}
    for uid in sop_classes:
        ae.add_requested_context(uid)
    host = "127.0.0.1" if settings.dicom_host in ("0.0.0.0", "::") else settings.dicom_host
    failures = 0
    for study in demo_studies(studies):
        assoc = ae.associate(host, settings.dicom_port, ae_title=settings.ae_title)
        if not assoc.is_established:
            print(
                f"cannot associate with {settings.ae_title}@{host}:{settings.dicom_port}: "
                "is `covidct serve` running?"
            )
            return 1
        statuses = [assoc.send_c_store(ds) for ds in study]
        assoc.release()
        bad = [s for s in statuses if getattr(s, "Status", 1) != 0]
        failures += len(bad)
        print(
            f"sent study {study[0].StudyInstanceUID} ({study[0].PatientName}): "
            f"{len(statuses) - len(bad)}/{len(statuses)} instances stored"
        )
    print(
        f"Results appear on http://{settings.web_host}:{settings.web_port}/ about "
        f"{settings.stable_seconds:.0f} s after the last instance of each study."
    )
    return 1 if failures else 0
