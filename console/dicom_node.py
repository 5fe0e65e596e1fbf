"""The DICOM receiver: a Storage SCP (C-STORE, C-ECHO) feeding the same ingest as uploads.

A CT scanner or PACS router sends to ``DICOM_AE_TITLE`` at ``DICOM_BIND:DICOM_PORT``.
Each instance, as sent (its dataset behind the file meta pynetdicom builds), goes
to :meth:`console.services.Services.accept` with ``source="dicom"``; the success
status (0x0000) is sent only after accept stored it durably and committed, so a
sender is never told an instance arrived that a crash could lose. An instance
sent again is a duplicate: ingest ignores it and the sender gets success.

Who may send (checked when the association is requested): a calling AE title
listed in ``DICOM_ALLOWED_AES``, addressed to our AE title; others get an
A-ASSOCIATE-RJ (rejected-permanent, "calling/called AE title not recognised").
With an empty list only peers on this host's loopback are accepted: an unset
list then never opens the node to the network (AE titles are not credentials,
and the bind address may already be 0.0.0.0 in a container), while ``make demo``
and a local ``storescu`` still work.

What is accepted: Verification, and CT Image Storage in the transfer syntaxes an
installed pydicom decoder reads (uncompressed little endian, JPEG lossless and
lossy, JPEG-LS, RLE, JPEG 2000 where a plugin reads them). Anything else is
refused in negotiation (presentation context rejected): other SOP classes,
Enhanced CT (multi-frame, which the decoder refuses), Deflated (the whole body
must be inflated before anything can be checked, PS3.5 A.5) and the retired big
endian. A received dataset the decoder refuses gets a failure status (0xA900
when it is not the CT image its SOP class promises, else 0xC000) whose
ErrorComment names the typed error; a full or locked store gets 0xA700 (out of
resources), which senders retry.

A series is complete when none of its instances arrived for ``DICOM_QUIET_S``
(gateways such as Orthanc call a study "stable" after such a quiet period):
console/completion.py judges that from the stored slices, so it survives a restart.

    receiver = DicomReceiver(DicomSettings.from_config(app.config), accept)
    receiver.start()   # raises DicomPortError when it cannot listen
    python -m pynetdicom storescu 127.0.0.1 11112 slice.dcm -aet CTSCANNER -aec HEMOTRIAGE
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import CTImageStorage, Verification
from pynetdicom.transport import ThreadedAssociationServer

from client.dicom import decodable
from client.errors import (
    HemoTriageError,
    MissingPixelDataError,
    MultiFrameDicomError,
    UnsupportedModalityError,
)
from console.errors import DicomPortError, StorageBusyError, StorageFullError
from console.ingest import IncomingFile, IngestResult

logger = logging.getLogger(__name__)

#: Ingests one received instance: ``accept([IncomingFile(name, part10_bytes)])``.
Accept = Callable[[list[IncomingFile]], IngestResult]

#: CT Image Storage transfer syntaxes, lossless first; offered only where a decoder is installed.
_CT_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    RLELossless,
    JPEG2000Lossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEGLSNearLossless,
    JPEG2000,
    HTJ2K,
    JPEGExtended12Bit,
    JPEGBaseline8Bit,
)
#: C-STORE statuses (PS3.4 Table B.2-1).
_SUCCESS = 0x0000
_OUT_OF_RESOURCES = 0xA700
_NOT_THE_SOP_CLASS = 0xA900
_CANNOT_UNDERSTAND = 0xC000
#: Typed errors meaning "this is not a single-frame CT image", as CT Image Storage promises.
_NOT_A_CT_IMAGE = (MissingPixelDataError, UnsupportedModalityError, MultiFrameDicomError)
#: A-ASSOCIATE-RJ: rejected-permanent, by the service user (PS3.8 Table 9-21).
_REJECTED_PERMANENT = 0x01
_SERVICE_USER = 0x01
_CALLING_AE_NOT_RECOGNISED = 0x03
_CALLED_AE_NOT_RECOGNISED = 0x07
#: ErrorComment (0000,0902) is LO: 64 characters at most (PS3.7 Annex C).
_COMMENT_CHARS = 64


@dataclass(frozen=True)
class DicomPeer:
    """A remote DICOM node: its AE title and TCP address.

    Attributes:
        ae_title: Its AE title.
        host: Host name or IP address.
        port: TCP port.
    """

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, value: str, setting: str) -> DicomPeer:
        """Read ``AE@host:port`` (``AE@[::1]:104`` for IPv6).

        Raises:
            ValueError: not of that form, naming ``setting``.
        """
        ae_title, _, address = value.strip().rpartition("@")
        host, _, port = address.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not ae_title or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{setting} must be AE@host:port (PACS@10.0.0.5:104), not {value!r}")
        return cls(_ae_title(ae_title, setting), host, int(port))


@dataclass(frozen=True)
class DicomSettings:
    """The receiver's settings, checked (``DICOM_*`` and ``RESULTS_DESTINATION``).

    Attributes:
        ae_title: Our AE title; associations must address it.
        bind: Address to listen on.
        port: TCP port; 0 when the receiver is off.
        allowed_aes: Calling AE titles that may send; empty: loopback peers only.
        quiet_s: A series is complete after this long without an instance.
        results_destination: Where results are sent, or None.
    """

    ae_title: str
    bind: str
    port: int
    allowed_aes: tuple[str, ...]
    quiet_s: float
    results_destination: DicomPeer | None

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> DicomSettings:
        """Read and check the settings (the console's config, or a plain mapping).

        Raises:
            ValueError: a malformed value, naming its ``HEMOTRIAGE_*`` variable.
        """
        port = config["DICOM_PORT"]
        if port in (None, ""):
            port = 0
        if not str(port).isdigit() or int(port) > 65535:
            raise ValueError(
                f"HEMOTRIAGE_DICOM_PORT must be 1 to 65535, or 0 or empty (receiver off), "
                f"not {port!r}"
            )
        allowed = config["DICOM_ALLOWED_AES"] or ()
        if isinstance(allowed, str):
            allowed = allowed.split(",")
        quiet = config["DICOM_QUIET_S"]
        try:
            quiet_s = float(quiet)
        except (TypeError, ValueError):
            quiet_s = 0.0  # refused just below, with the value as given
        if not quiet_s > 0:
            raise ValueError(f"HEMOTRIAGE_DICOM_QUIET_S must be seconds above 0, not {quiet!r}")
        destination = str(config["RESULTS_DESTINATION"] or "").strip()
        return cls(
            ae_title=_ae_title(str(config["DICOM_AE_TITLE"]), "HEMOTRIAGE_DICOM_AE_TITLE"),
            bind=str(config["DICOM_BIND"]),
            port=int(port),
            allowed_aes=tuple(
                _ae_title(a, "HEMOTRIAGE_DICOM_ALLOWED_AES") for a in allowed if str(a).strip()
            ),
            quiet_s=quiet_s,
            results_destination=(
                DicomPeer.parse(destination, "HEMOTRIAGE_RESULTS_DESTINATION")
                if destination
                else None
            ),
        )


class DicomReceiver:
    """The Storage SCP (pynetdicom runs its accept loop and one thread per association).

    Args:
        settings: Checked settings (``settings.port`` not 0).
        accept: Ingests one instance; raises the typed reason it was refused.
    """

    def __init__(self, settings: DicomSettings, accept: Accept) -> None:
        self.settings = settings
        self._accept = accept
        self._ae = AE(ae_title=settings.ae_title)
        self._ae.add_supported_context(
            Verification, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
        )
        self._ae.add_supported_context(CTImageStorage, transfer_syntaxes())
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        """Listen (once).

        Raises:
            DicomPortError: the address cannot be bound (the port is taken, say).
        """
        if self._server is not None:
            return
        address = (self.settings.bind, self.settings.port)
        try:
            self._server = self._ae.start_server(
                address,
                block=False,
                evt_handlers=[
                    (evt.EVT_REQUESTED, self._on_requested),
                    (evt.EVT_C_STORE, self._on_store),
                ],
            )
        except OSError as e:
            raise DicomPortError(
                f"the DICOM receiver cannot listen on {address[0]}:{address[1]} ({e.strerror}); "
                "set HEMOTRIAGE_DICOM_PORT (or HEMOTRIAGE_DICOM_BIND) to a free one"
            ) from e
        logger.info(
            "DICOM receiver %s listening on %s:%d (allowed calling AEs: %s)",
            self.settings.ae_title,
            *address,
            ", ".join(self.settings.allowed_aes) or "any, over loopback only",
        )

    def stop(self) -> None:
        """Abort open associations and close the port; unacknowledged instances are resent."""
        if self._server is not None:
            self._ae.shutdown()
            self._server = None

    def is_alive(self) -> bool:
        """The port is open (False before start, after stop, or if the server died).

        pynetdicom's accept loop is a daemon thread that ends only when the
        server is shut down, which closes the socket, so the socket stands for it.
        """
        server = self._server
        return server is not None and server.socket.fileno() != -1

    def _on_requested(self, event: Event) -> None:
        """Reject an association from a calling AE not allowed, or to another called AE.

        A sender addressing another AE title is misconfigured: it is told, and
        nothing it sends is taken.
        """
        request = event.assoc.requestor.primitive
        calling = request.calling_ae_title.strip()
        peer = event.assoc.requestor.address
        if request.called_ae_title.strip() != self.settings.ae_title:
            diagnostic = _CALLED_AE_NOT_RECOGNISED
        elif not _allowed(calling, peer, self.settings.allowed_aes):
            diagnostic = _CALLING_AE_NOT_RECOGNISED
        else:
            return
        logger.warning(
            "DICOM association from %s at %s to %s rejected (diagnostic 0x%02X)",
            calling,
            peer,
            request.called_ae_title.strip(),
            diagnostic,
        )
        # What pynetdicom's own negotiation does on rejection: send A-ASSOCIATE-RJ, then wait
        # for the peer to close (or the ARTIM timer) before the connection goes.
        event.assoc.acse.send_reject(_REJECTED_PERMANENT, _SERVICE_USER, diagnostic)
        event.assoc.kill()

    def _on_store(self, event: Event) -> int | Dataset:
        """Hand one instance to ingest; success only once it is stored and committed."""
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        name = f"{sop_uid}.dcm"
        calling = event.assoc.requestor.ae_title
        try:
            self._accept([IncomingFile(name, event.encoded_dataset())])
        except (StorageFullError, StorageBusyError) as e:
            return _failure(_OUT_OF_RESOURCES, e, name, calling)
        except _NOT_A_CT_IMAGE as e:
            return _failure(_NOT_THE_SOP_CLASS, e, name, calling)
        except HemoTriageError as e:
            return _failure(_CANNOT_UNDERSTAND, e, name, calling)
        return _SUCCESS


def transfer_syntaxes() -> list[UID]:
    """The CT transfer syntaxes the receiver accepts: those an installed decoder reads."""
    return [uid for uid in _CT_SYNTAXES if decodable(uid)]


def _allowed(calling: str, peer: str, allowed_aes: tuple[str, ...]) -> bool:
    """A listed calling AE title; with an empty list, any title from a loopback address."""
    if allowed_aes:
        return calling in allowed_aes
    address = ipaddress.ip_address(peer)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _failure(status: int, error: HemoTriageError, name: str, calling: str) -> Dataset:
    """A failure status whose ErrorComment names the typed error and its reason."""
    # The UID-named file is logged; the message is not (it may quote the dataset's values).
    logger.warning(
        "C-STORE of %s from %s refused (0x%04X): %s", name, calling, status, type(error).__name__
    )
    reason = str(error).removeprefix(f"{name}: ")
    comment = f"{type(error).__name__}: {reason}"
    answer = Dataset()
    answer.Status = status
    # LO: the default character repertoire without backslash or control characters.
    answer.ErrorComment = "".join(
        c if " " <= c <= "~" and c != "\\" else "?" for c in comment[:_COMMENT_CHARS]
    )
    return answer


def _ae_title(value: str, setting: str) -> str:
    """An AE title: 1 to 16 printable ASCII characters, no backslash (PS3.5 Table 6.2-1)."""
    title = str(value).strip()
    if not 0 < len(title) <= 16 or not all(" " <= c <= "~" and c != "\\" for c in title):
        raise ValueError(
            f"{setting}: {value!r} is not an AE title (1 to 16 characters, no backslash)"
        )
    return title
