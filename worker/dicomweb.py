"""DICOMweb out: the outbox's STOW-RS client (PS3.18 10.5), through dicomweb-client.

One request per delivery holds every object of it; the answer must name none of them in
FailedSOPSequence.  Credentials: ``user:password@`` in the destination's URL (HTTP basic), else
``COVIDCT_DICOMWEB_TOKEN`` as a bearer token, else none.  Timeouts: connecting
``COVIDCT_ACSE_TIMEOUT``, reading ``COVIDCT_NETWORK_TIMEOUT``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pydicom
import requests

from core.settings import Settings
from core.values import Destination
from worker.errors import DeliveryError


class _Session(requests.Session):
    """A session whose requests time out (requests' own default is to wait forever)."""

    def __init__(self, timeout: tuple[float, float]) -> None:
        super().__init__()
        self._timeout = timeout

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs.setdefault("timeout", self._timeout)
        return super().request(*args, **kwargs)


def stow_rs(settings: Settings, dest: Destination, paths: Sequence[str]) -> None:
    """Store ``paths`` at ``dest``; raise :class:`DeliveryError` unless each is stored."""
    from dicomweb_client.api import DICOMwebClient

    session = _Session((settings.acse_timeout, settings.network_timeout))
    headers: dict[str, str] = {}
    if dest.username:
        session.auth = (dest.username, dest.password)
    elif settings.dicomweb_token:
        headers["Authorization"] = f"Bearer {settings.dicomweb_token}"
    client = DICOMwebClient(url=dest.url, session=session, headers=headers)
    datasets = [pydicom.dcmread(p) for p in paths]
    try:
        answer = client.store_instances(datasets)
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        raise DeliveryError(f"{dest} answered HTTP {code}") from None
    except requests.RequestException as exc:
        raise DeliveryError(f"{dest}: {exc.__class__.__name__}: {exc}"[:300]) from None
    failed = answer.get("FailedSOPSequence") if answer is not None else None
    if failed:
        reasons = sorted({f"0x{int(i.get('FailureReason', 0)):04X}" for i in failed})
        raise DeliveryError(
            f"{dest} refused {len(failed)} of {len(datasets)}: {', '.join(reasons)}"
        )
