"""The hand-encoded C-STORE-RSP is byte for byte what pynetdicom sends, or is not used."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from ingest.store_response import encode_store_rsp

pytestmark = pytest.mark.unit

CT = "1.2.840.10008.5.1.4.1.1.2"  # 25 characters: padded
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
SOP_EVEN = "1.2.826.0.1.3680043.8.498.1234567890123456789012345678901234567"
SOP_ODD = SOP_EVEN[:-1]


def _rsp(status: int, message_id: int, sop_class: str | None, sop: str | None) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageID = message_id
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop
    rsp.Status = status
    return rsp


def _pynetdicom_bytes(rsp: C_STORE) -> bytes:
    """The command set exactly as pynetdicom puts it in its one P-DATA fragment."""
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = list(message.encode_msg(1, 16384))
    ((context_id, fragment),) = pdata.presentation_data_value_list
    assert context_id == 1 and fragment[:1] == b"\x03"
    return fragment[1:]


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC210, 0xC211, 0xB000])
@pytest.mark.parametrize("message_id", [1, 2, 255, 256, 65535])
@pytest.mark.parametrize(
    "uids",
    [(CT, SOP_EVEN), (CT, SOP_ODD), (ENHANCED_CT, "1.2.3"), (CT, None), (None, None)],
    ids=["even", "odd", "short", "no-instance", "no-uids"],
)
def test_same_bytes_as_pynetdicom(
    status: int, message_id: int, uids: tuple[str | None, str | None]
) -> None:
    rsp = _rsp(status, message_id, *uids)
    assert encode_store_rsp(rsp) == _pynetdicom_bytes(rsp)


def test_responses_it_does_not_know_go_to_pynetdicom() -> None:
    with_comment = _rsp(0xC210, 3, CT, SOP_ODD)
    with_comment.ErrorComment = "cannot parse"
    with_offending = _rsp(0xA900, 3, CT, SOP_ODD)
    with_offending.OffendingElement = [0x00080016]
    request = C_STORE()  # a C-STORE-RQ (no MessageIDBeingRespondedTo)
    request.MessageID = 3
    request.AffectedSOPClassUID = CT
    for primitive in (with_comment, with_offending, request):
        assert encode_store_rsp(primitive) is None
