"""The C-STORE-RSP, encoded by hand: the most expensive step of a C-STORE in pynetdicom.

pynetdicom builds every outgoing DIMSE message as a pydicom Dataset and encodes it twice (once
to learn the command group length).  For the seven-element response to a C-STORE that took
about 300 us, the largest share of the listener's CPU per 525 KB instance after the handler
(py-spy).  A C-STORE-RSP with only a status (what :func:`ingest.handlers.handle_store`
returns) is written here in Implicit VR Little Endian directly, byte for byte what pynetdicom
would send (``tests/test_store_response.py`` compares the two).  Anything else (an error comment, an
offending element, a handler bound to EVT_DIMSE_SENT, a peer whose maximum PDU is too small
for one fragment) goes through pynetdicom's own path.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any

C_STORE_RSP = 0x8001
NO_DATASET = 0x0101
_LAST_COMMAND_FRAGMENT = b"\x03"  # PS3.8 E.2: command information, last fragment


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid(value: object) -> bytes:
    raw = str(value).encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_store_rsp(rsp: Any) -> bytes | None:
    """The command set of a C-STORE-RSP primitive, or None if it needs pynetdicom's encoder."""
    if (
        rsp.MessageIDBeingRespondedTo is None
        or rsp.Status is None
        or rsp.ErrorComment is not None
        or rsp.OffendingElement is not None
    ):
        return None
    try:
        body = [
            _element(0x0002, _uid(rsp.AffectedSOPClassUID)) if rsp.AffectedSOPClassUID else b"",
            _element(0x0100, struct.pack("<H", C_STORE_RSP)),
            _element(0x0120, struct.pack("<H", rsp.MessageIDBeingRespondedTo)),
            _element(0x0800, struct.pack("<H", NO_DATASET)),
            _element(0x0900, struct.pack("<H", rsp.Status)),
            _element(0x1000, _uid(rsp.AffectedSOPInstanceUID))
            if rsp.AffectedSOPInstanceUID
            else b"",
        ]
    except (struct.error, UnicodeEncodeError):
        return None
    rest = b"".join(body)
    return _element(0x0000, struct.pack("<I", len(rest))) + rest


def fast_send_msg(send_msg: Callable[..., None]) -> Callable[..., None]:
    """``DIMSEServiceProvider.send_msg`` with the shortcut for plain C-STORE responses."""
    from pynetdicom import evt
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu_primitives import P_DATA

    @functools.wraps(send_msg)  # keeps the original as __wrapped__ (tuning.compatible reads it)
    def send(self: Any, primitive: Any, context_id: int) -> None:
        if type(primitive) is C_STORE and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            encoded = encode_store_rsp(primitive)
            limit = self.maximum_pdu_size
            if encoded is not None and (not limit or len(encoded) <= limit - 6):  # 1 fragment
                pdata = P_DATA()
                pdata.presentation_data_value_list.append(
                    (context_id, _LAST_COMMAND_FRAGMENT + encoded)
                )
                self.dul.send_pdu(pdata)
                return
        send_msg(self, primitive, context_id)

    send.covidct_tuning = True  # type: ignore[attr-defined]
    return send
