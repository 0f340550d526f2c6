"""What the radiologist sees in their own PACS viewer besides the SR: key images and a Key
Object Selection document, built with highdicom.

* **Secondary Capture** images of the study's key slices (:func:`classifier.aggregate.
  key_slice_indices`: the highest-scoring slices, 10 mm apart at least), each the slice in the
  lung window with the lungs' contours and the opacity map burned in (the same picture as the
  dashboard's), and a caption: the call, the probabilities, the model, "not for diagnostic
  use".  BurnedInAnnotation YES, ImageType DERIVED\\SECONDARY, a series of their own in the
  study, the source slice in SourceImageSequence.  When the lungs failed the segmentation's
  checks no map is drawn (it would show lung the segmentation lost) and the caption says so.
* a **Key Object Selection** (TID 2010, "Of Interest") flagging the key source slices and
  their pictures, so that viewers that honour key images open on them.

UIDs are derived from the study, the model and the generation, as the SR's are: a re-run
builds the same objects, and the PACS receives them again under the same UIDs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sc import SCImage
from highdicom.sr import CodedConcept, DeviceObserverIdentifyingAttributes, ObserverContext
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from classifier.preprocess import windowed_slice
from classifier.render import draw_overlay, pixel_spacing, square_pixels, with_caption
from worker.selection import SliceRef, orientation
from worker.sr import with_type2_defaults

KEY_IMAGE_PX = 512  # the pictures' longer side: a PACS viewer scales them to its window
SC_SERIES_NUMBER = 9902
KO_SERIES_NUMBER = 9903
SC_SERIES_DESCRIPTION = "AI KEY IMAGES - NOT FOR DIAGNOSTIC USE"
KO_SERIES_DESCRIPTION = "AI KEY OBJECTS - NOT FOR DIAGNOSTIC USE"
OF_INTEREST = CodedConcept("113000", "DCM", "Of Interest")  # CID 7010
LEGEND = "cyan/yellow: right/left lung; orange: ground glass; red: consolidation"


@dataclass(frozen=True)
class KeySlice:
    """A slice behind the call: where it is, its probability, and the segmentation's mask
    bits on it (None: no map to draw)."""

    ref: SliceRef
    header: Dataset
    probability: float
    zone: str
    code: np.ndarray | None


@dataclass(frozen=True)
class Caption:
    """What each picture says besides its own slice's figures."""

    verdict: str
    probability: float
    model_version: str
    lungs_ok: bool


def _letters(direction: Sequence[float]) -> str:
    """The patient-orientation letters of one direction cosine (PS3.3 C.7.6.1.1.1): the
    dominant axis first, others that weigh more than a third after it."""
    names = (("L", "R"), ("P", "A"), ("H", "F"))
    ranked = sorted(range(3), key=lambda i: -abs(direction[i]))
    out = [names[i][0 if direction[i] > 0 else 1] for i in ranked if abs(direction[i]) > 0.33]
    return "".join(out[:3]) or names[ranked[0]][0 if direction[ranked[0]] > 0 else 1]


def patient_orientation(ds: Dataset, frame: int = 0) -> tuple[str, str]:
    """Where the rows and columns of the picture point in the patient (the picture keeps
    the slice's orientation); the usual axial ("L", "P") when the slice does not say."""
    iop = orientation(ds, frame)
    if iop is None or len(iop) != 6:
        return "L", "P"
    return _letters(iop[:3]), _letters(iop[3:])


def picture(key: KeySlice, pixels: Dataset, caption: Caption) -> np.ndarray:
    """The key image: the slice in the lung window, square pixels, the map when there is
    one, the caption below."""
    gray = square_pixels(windowed_slice(pixels, key.ref.frame), pixel_spacing(pixels), KEY_IMAGE_PX)
    if key.code is not None and caption.lungs_ok:
        rgb = draw_overlay(gray, key.code, KEY_IMAGE_PX)
        map_line = LEGEND
    else:
        rgb = np.repeat(gray[..., np.newaxis], 3, axis=2)
        map_line = "no opacity map: the lungs were not segmented reliably"
    where = f", {key.zone} zone" if key.zone else ""
    lines = [
        f"covidct AI: COVID-19 {caption.verdict}, study p={caption.probability:.2f};"
        f" this slice p={key.probability:.2f}{where}",
        map_line,
        f"model {caption.model_version[:40]} - NOT FOR DIAGNOSTIC USE",
    ]
    return with_caption(rgb, lines)


def build_key_images(
    keys: Sequence[KeySlice],
    caption: Caption,
    uid_of: Callable[..., str],
    manufacturer: str,
) -> list[SCImage]:
    """One Secondary Capture image per key slice, in a series of their own; ``uid_of(kind,
    ...)`` gives this report's UID of each object."""
    series_uid = uid_of("sc-series")
    out = []
    for number, key in enumerate(keys, start=1):
        pixels = pydicom.dcmread(key.ref.path)
        sc = SCImage.from_ref_dataset(
            ref_dataset=with_type2_defaults(key.header),
            pixel_array=picture(key, pixels, caption),
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid,
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=uid_of("sc", str(number)),
            instance_number=number,
            manufacturer=manufacturer,
            patient_orientation=patient_orientation(key.header, key.ref.frame),
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
        sc.SeriesDescription = SC_SERIES_DESCRIPTION
        # the picture shows the chest whatever the source says: not a paired structure, so
        # Laterality (Type 2C) stays out
        sc.BodyPartExamined = "CHEST"
        sc.BurnedInAnnotation = "YES"
        sc.ConversionType = "WSD"  # made on a workstation, not digitised
        sc.DerivationDescription = (
            "lung window with the AI's lung segmentation and opacity map; caption burned in"
        )
        source = Dataset()
        source.ReferencedSOPClassUID = key.header.SOPClassUID
        source.ReferencedSOPInstanceUID = key.header.SOPInstanceUID
        if int(key.header.get("NumberOfFrames", 1) or 1) > 1:
            source.ReferencedFrameNumber = key.ref.frame + 1
        sc.SourceImageSequence = [source]
        out.append(sc)
    return out


KOS_DESCRIPTION_CHARS = 1024


def kos_description(verdict: str, basis: str) -> str:
    """TID 2010's Key Object Description: the call and why (which rule made an
    Indeterminate, what the lungs measured), for viewers that show it beside the key images
    (the SR carries no free text); then what the key images are."""
    text = (
        f"AI result, not for diagnostic use. COVID-19 {verdict}: {basis}."
        " Key images: the slices with the highest COVID-19 probability."
    )
    return text[:KOS_DESCRIPTION_CHARS]


def build_kos(
    keys: Sequence[KeySlice],
    images: Sequence[Dataset],
    uid_of: Callable[..., str],
    device: DeviceObserverIdentifyingAttributes,
    manufacturer: str,
    description: str,
) -> KeyObjectSelectionDocument:
    """The Key Object Selection flagging the key source slices and their pictures."""
    referenced = [k.header for k in keys] + list(images)
    content = KeyObjectSelection(
        document_title=OF_INTEREST,
        referenced_objects=referenced,
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        ),
        description=description,
    )
    kos = KeyObjectSelectionDocument(
        evidence=[with_type2_defaults(referenced[0]), *referenced[1:]],
        content=content,
        series_instance_uid=uid_of("ko-series"),
        series_number=KO_SERIES_NUMBER,
        sop_instance_uid=uid_of("ko"),
        instance_number=1,
        manufacturer=manufacturer,
    )
    kos.SeriesDescription = KO_SERIES_DESCRIPTION
    # TID 2010 names no concept for its IMAGE and COMPOSITE rows, and PixelMed's validator
    # (the IHE AI Results test tools') refuses one; highdicom writes "Source" there
    for item in kos.ContentSequence:
        if item.ValueType in ("IMAGE", "COMPOSITE") and "ConceptNameCodeSequence" in item:
            del item.ConceptNameCodeSequence
    return kos
