"""DICOMweb on central (STOW-RS, QIDO-RS, WADO-RS), with dicomweb-client and requests on loopback."""
from __future__ import annotations

import warnings
from io import BytesIO

import pydicom
import pytest_twisted
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.uid import UID
from twisted.internet.threads import deferToThread

from medd.storage import index
from tests.conftest import all_testdata_files, bearer, centre_token, listener_port, testdata

LISTEN = {"http": "tcp:0:interface=127.0.0.1"}
STORAGE_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4."


async def _reader(node) -> dict[str, str]:
    """Headers with a new administrator's token: central's DICOMweb reads only with one."""
    token = await node.central_storage.directory.add_admin(f"reader-{len(READERS)}")
    READERS.append(token)
    return {"Authorization": f"Bearer {token}"}


READERS: list[str] = []


class _ReadAndWrite(requests.auth.AuthBase):
    """Bearer auth by method: a reader's token reads, a registered centre's token stores (STOW-RS)."""

    def __init__(self, read: str, write: str):
        self.read, self.write = read, write

    def __call__(self, r):
        r.headers["Authorization"] = f"Bearer {self.write if r.method == 'POST' else self.read}"
        return r


async def _client(node) -> DICOMwebClient:
    """A dicomweb-client that reads as an administrator and stores as centre-a."""
    session = requests.Session()
    session.auth = _ReadAndWrite((await _reader(node))["Authorization"].split()[1], await _writer(node))
    return DICOMwebClient(url=f"http://127.0.0.1:{listener_port(node, 'http')}/dicomweb", session=session)


async def _writer(node) -> str:
    """centre-a's token (registered on first use): STOW-RS takes instances only from a registered sender."""
    token = getattr(node, "test_centre_token", None)
    if token is None:
        token = node.test_centre_token = await centre_token(node)
    return token


def _url(node, path: str) -> str:
    return f"http://127.0.0.1:{listener_port(node, 'http')}/dicomweb{path}"


def _multipart(parts: list[tuple[str, bytes]], boundary: str = "medd-test-boundary") -> tuple[bytes, str]:
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: " + ctype.encode() + b"\r\n\r\n" + data + b"\r\n"
        for ctype, data in parts
    ) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


async def _stow(node, parts: list[tuple[str, bytes]], path: str = "/studies") -> requests.Response:
    body, ctype = _multipart(parts)
    return await deferToThread(requests.post, _url(node, path), data=body,
                               headers=bearer(await _writer(node), **{"Content-Type": ctype}), timeout=60)


@pytest_twisted.ensureDeferred
async def test_reading_needs_an_administrators_token(make_central):
    """Anonymous QIDO-RS and WADO-RS on central are 401 problem JSON (with WWW-Authenticate), a token
    that is no one's is 401 (invalid_token), a centre's (which may only write) 403, an administrator's
    is served."""
    node = await make_central(LISTEN)
    stored = await node.ingest.receive_dicom(testdata("CT_small.dcm"), transport="test", origin="MOD")
    for path in ("/studies", f"/studies/{stored.study_instance_uid}", f"/studies/{stored.study_instance_uid}/metadata"):
        anonymous = await deferToThread(requests.get, _url(node, path), timeout=30)
        assert anonymous.status_code == 401, path
        assert anonymous.headers["Content-Type"] == "application/problem+json"
        assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = await deferToThread(requests.get, _url(node, path), headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401, path
        assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
        writer = await deferToThread(requests.get, _url(node, path), headers=bearer(await _writer(node)), timeout=30)
        assert writer.status_code == 403, path
        assert writer.json()["type"] == "urn:medd:problem:forbidden"
    served = await deferToThread(requests.get, _url(node, "/studies"), headers=await _reader(node), timeout=30)
    assert served.status_code == 200 and len(served.json()) == 1


def _blob_files(node) -> list:
    return [p for p in (node.config.storage_path / "blobs").rglob("*") if p.is_file()]


def _values(item: dict, tag: str):
    return item.get(tag, {}).get("Value", [])


@pytest_twisted.ensureDeferred
async def test_stow_qido_wado_round_trip(make_central):
    """Instances stored with dicomweb-client's store_instances are found by QIDO-RS at study, series
    and instance level with their key attributes, and WADO-RS returns the identical dataset."""
    node = await make_central(LISTEN)
    client = await _client(node)
    paths = [get_testdata_file(n) for n in ("CT_small.dcm", "MR_small.dcm")]
    sources = [pydicom.dcmread(p) for p in paths]

    answer = await deferToThread(client.store_instances, sources)
    stored_uids = {item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence}
    assert stored_uids == {ds.SOPInstanceUID for ds in sources}
    assert "FailedSOPSequence" not in answer

    ct = sources[0]
    studies = await deferToThread(client.search_for_studies, search_filters={"PatientID": ct.PatientID})
    assert len(studies) == 1
    study = pydicom.Dataset.from_json(studies[0])
    assert study.StudyInstanceUID == ct.StudyInstanceUID
    assert study.PatientName == ct.PatientName
    assert study.StudyDate == ct.StudyDate
    assert study.ModalitiesInStudy == "CT"
    assert study.NumberOfStudyRelatedSeries == 1
    assert study.NumberOfStudyRelatedInstances == 1
    assert "AccessionNumber" in study
    assert study.RetrieveURL.endswith(f"/dicomweb/studies/{ct.StudyInstanceUID}")

    series = await deferToThread(client.search_for_series, study_instance_uid=ct.StudyInstanceUID)
    assert [pydicom.Dataset.from_json(s).SeriesInstanceUID for s in series] == [ct.SeriesInstanceUID]
    assert pydicom.Dataset.from_json(series[0]).Modality == "CT"

    instances = await deferToThread(
        client.search_for_instances, study_instance_uid=ct.StudyInstanceUID, series_instance_uid=ct.SeriesInstanceUID
    )
    assert len(instances) == 1
    instance = pydicom.Dataset.from_json(instances[0])
    assert instance.SOPInstanceUID == ct.SOPInstanceUID
    assert instance.SOPClassUID == ct.SOPClassUID
    assert instance.Rows == ct.Rows and instance.Columns == ct.Columns

    retrieved = await deferToThread(
        client.retrieve_instance, ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID
    )
    assert retrieved == ct
    assert retrieved.PixelData == ct.PixelData

    metadata = await deferToThread(
        client.retrieve_instance_metadata, ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID
    )
    meta = pydicom.Dataset.from_json(metadata)
    assert meta.SOPInstanceUID == ct.SOPInstanceUID and "PixelData" not in meta

    whole_study = await deferToThread(client.retrieve_study, ct.StudyInstanceUID)
    assert [ds.SOPInstanceUID for ds in whole_study] == [ct.SOPInstanceUID]
    whole_series = await deferToThread(client.retrieve_series, ct.StudyInstanceUID, ct.SeriesInstanceUID)
    assert [ds.SOPInstanceUID for ds in whole_series] == [ct.SOPInstanceUID]


@pytest_twisted.ensureDeferred
async def test_qido_query_keys(make_central):
    """QIDO-RS matches PatientID, PatientName (with wildcards), StudyDate ranges, ModalitiesInStudy,
    AccessionNumber, tag-number keys, SOPInstanceUID and honours limit/offset."""
    node = await make_central(LISTEN)
    client = await _client(node)
    names = ("CT_small.dcm", "MR_small.dcm", "rtdose.dcm")
    sources = [pydicom.dcmread(get_testdata_file(n)) for n in names]
    await deferToThread(client.store_instances, sources)
    ct, mr = sources[0], sources[1]

    async def study_uids(**filters):
        found = await deferToThread(client.search_for_studies, search_filters=filters)
        return {pydicom.Dataset.from_json(s).StudyInstanceUID for s in found}

    assert await study_uids(PatientID=ct.PatientID) == {ct.StudyInstanceUID}
    assert await study_uids(**{"00100020": mr.PatientID}) == {mr.StudyInstanceUID}
    assert await study_uids(PatientName=str(ct.PatientName)[:-1] + "?") == {ct.StudyInstanceUID}
    assert await study_uids(PatientName="*") == {ds.StudyInstanceUID for ds in sources}
    assert await study_uids(ModalitiesInStudy="MR") == {mr.StudyInstanceUID}
    assert await study_uids(ModalitiesInStudy="CT\\MR") == {ct.StudyInstanceUID, mr.StudyInstanceUID}
    assert await study_uids(StudyDate=f"{ct.StudyDate}-{ct.StudyDate}") == {
        ds.StudyInstanceUID for ds in sources if ds.StudyDate == ct.StudyDate
    }
    assert await study_uids(StudyDate="-19000101") == set()
    assert await study_uids(StudyInstanceUID=mr.StudyInstanceUID) == {mr.StudyInstanceUID}
    assert await study_uids(AccessionNumber="no-such-accession") == set()

    every = await deferToThread(client.search_for_studies)
    assert len(every) == len({ds.StudyInstanceUID for ds in sources})
    first = await deferToThread(client.search_for_studies, limit=1)
    rest = await deferToThread(client.search_for_studies, offset=1)
    assert len(first) == 1 and len(rest) == len(every) - 1
    assert pydicom.Dataset.from_json(first[0]).StudyInstanceUID not in {
        pydicom.Dataset.from_json(s).StudyInstanceUID for s in rest
    }

    by_sop = await deferToThread(client.search_for_instances, search_filters={"SOPInstanceUID": mr.SOPInstanceUID})
    assert [pydicom.Dataset.from_json(i).SeriesInstanceUID for i in by_sop] == [mr.SeriesInstanceUID]
    all_series = await deferToThread(client.search_for_series, search_filters={"Modality": "CT"})
    assert [pydicom.Dataset.from_json(s).SeriesInstanceUID for s in all_series] == [ct.SeriesInstanceUID]
    in_study = await deferToThread(client.search_for_instances, study_instance_uid=mr.StudyInstanceUID)
    assert [pydicom.Dataset.from_json(i).SOPInstanceUID for i in in_study] == [mr.SOPInstanceUID]


@pytest_twisted.ensureDeferred
async def test_qido_bad_queries_are_400(make_central):
    """Unknown query keys, malformed dates, UIDs and limits are 400 problem JSON, never an empty match."""
    node = await make_central(LISTEN)
    headers = await _reader(node)
    for query in ("Colour=blue", "StudyDescription=x", "StudyDate=yesterday", "StudyInstanceUID=1.2.abc",
                  "limit=-1", "99990010=x"):
        response = await deferToThread(requests.get, _url(node, f"/studies?{query}"), headers=headers, timeout=30)
        assert response.status_code == 400, query
        assert response.headers["Content-Type"] == "application/problem+json"
        assert response.json()["status"] == 400


@pytest_twisted.ensureDeferred
async def test_qido_offset_and_limit_out_of_range_are_400_not_500(make_central):
    """An offset beyond what a database can hold (2^63), or a limit or offset that is negative, not ASCII digits
    or thousands of digits long, is 400 problem JSON with no traceback; a huge limit is the most medd answers."""
    node = await make_central(LISTEN)
    headers = await _reader(node)
    for query in ("offset=9223372036854775808", "offset=9223372036854775807", "offset=2147483648",
                  "offset=" + "9" * 5000, "offset=-1", "offset=%2B1", "offset=1_0", "offset=%D9%A1", "offset=",
                  "limit=-5", "limit=ten", "limit=%EF%BC%91", "limit=1e3", "limit=0x10", "limit="):
        for level in ("/studies", "/series", "/instances"):
            response = await deferToThread(requests.get, _url(node, f"{level}?{query}"), headers=headers, timeout=30)
            assert response.status_code == 400, (level, query, response.text[:200])
            assert response.headers["Content-Type"] == "application/problem+json"
            assert "Traceback" not in response.text and response.json()["status"] == 400
    for query in ("limit=9223372036854775808", "limit=" + "9" * 5000, "offset=2147483647", "limit=0010&offset=000"):
        response = await deferToThread(requests.get, _url(node, f"/studies?{query}"), headers=headers, timeout=30)
        assert response.status_code in (200, 204), (query, response.text[:200])


@pytest_twisted.ensureDeferred
async def test_wado_not_found_is_404(make_central):
    """Retrieving an instance, series or study that is not stored is 404 problem JSON."""
    node = await make_central(LISTEN)
    headers = await _reader(node)
    for path in ("/studies/1.2.3", "/studies/1.2.3/series/1.2.4", "/studies/1.2.3/series/1.2.4/instances/1.2.5",
                 "/studies/1.2.3/series/1.2.4/instances/1.2.5/metadata"):
        response = await deferToThread(requests.get, _url(node, path), headers=headers, timeout=30)
        assert response.status_code == 404, path
        assert response.headers["Content-Type"] == "application/problem+json"


@pytest_twisted.ensureDeferred
async def test_stow_non_dicom_part_fails_alone(make_central):
    """A part that is not DICOM is listed in FailedSOPSequence with FailureReason 0xC000 and a
    readable reason, the good part beside it is stored (202), and the bad part leaves nothing."""
    node = await make_central(LISTEN)
    ct = testdata("CT_small.dcm")
    response = await _stow(node, [("application/dicom", b"GIF89a not dicom at all"), ("application/dicom", ct)])
    assert response.status_code == 202
    assert response.headers["Content-Type"] == "application/dicom+json"
    answer = pydicom.Dataset.from_json(response.json())
    assert len(answer.FailedSOPSequence) == 1
    failed = answer.FailedSOPSequence[0]
    assert failed.FailureReason == 0xC000
    assert "not a DICOM" in failed[0x00000902].value
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [pydicom.dcmread(BytesIO(ct)).SOPInstanceUID]
    assert await node.database.run(index.count_objects) == 1
    assert len(_blob_files(node)) == 1


@pytest_twisted.ensureDeferred
async def test_stow_all_failed_is_409_and_nothing_stored(make_central):
    """When no part can be stored (a non-DICOM part, a part of another media type) the answer is 409 and nothing is stored."""
    node = await make_central(LISTEN)
    response = await _stow(node, [("application/dicom", b"\0" * 200), ("text/plain", b"hello")])
    assert response.status_code == 409
    answer = pydicom.Dataset.from_json(response.json())
    assert [f.FailureReason for f in answer.FailedSOPSequence] == [0xC000, 0xC000]
    assert "ReferencedSOPSequence" not in answer
    assert await node.database.run(index.count_objects) == 0
    assert not _blob_files(node)


@pytest_twisted.ensureDeferred
async def test_stow_to_study_refuses_other_study(make_central):
    """POST /studies/{study} stores the parts of that study and fails the part of another study, storing nothing of it."""
    node = await make_central(LISTEN)
    ct_bytes, mr_bytes = testdata("CT_small.dcm"), testdata("MR_small.dcm")
    ct, mr = pydicom.dcmread(BytesIO(ct_bytes)), pydicom.dcmread(BytesIO(mr_bytes))
    response = await _stow(node, [("application/dicom", ct_bytes), ("application/dicom", mr_bytes)],
                           path=f"/studies/{ct.StudyInstanceUID}")
    assert response.status_code == 202
    answer = pydicom.Dataset.from_json(response.json())
    assert answer.RetrieveURL.endswith(f"/studies/{ct.StudyInstanceUID}")
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [ct.SOPInstanceUID]
    assert [f.ReferencedSOPInstanceUID for f in answer.FailedSOPSequence] == [mr.SOPInstanceUID]
    assert await node.database.run(lambda c: index.object_by_uid(c, mr.SOPInstanceUID)) is None


@pytest_twisted.ensureDeferred
async def test_stow_bad_requests(make_central):
    """A STOW-RS request of the wrong media type is 415; a multipart body that is cut short is 400; both store nothing."""
    node = await make_central(LISTEN)
    wrong = await deferToThread(requests.post, _url(node, "/studies"), data=testdata("CT_small.dcm"),
                                headers=bearer(await _writer(node), **{"Content-Type": "application/dicom"}), timeout=30)
    assert wrong.status_code == 415
    assert wrong.headers["Content-Type"] == "application/problem+json"
    body, ctype = _multipart([("application/dicom", testdata("CT_small.dcm"))])
    cut = await deferToThread(requests.post, _url(node, "/studies"), data=body[: len(body) // 2],
                              headers=bearer(await _writer(node), **{"Content-Type": ctype}), timeout=30)
    assert cut.status_code == 400
    assert cut.headers["Content-Type"] == "application/problem+json"
    assert await node.database.run(index.count_objects) == 0


@pytest_twisted.ensureDeferred
async def test_stow_oversized_part_413(make_central):
    """A STOW-RS body over the object size limit is refused 413 from its Content-Length."""
    node = await make_central(LISTEN, extra="[limits]\nmax_object_size = 10K\n")
    response = await _stow(node, [("application/dicom", testdata("CT_small.dcm"))])
    assert response.status_code == 413
    assert response.headers["Content-Type"] == "application/problem+json"
    assert await node.database.run(index.count_objects) == 0


@pytest_twisted.ensureDeferred
async def test_stow_part_with_an_unreadable_value_fails_alone_not_500(make_central):
    """A part whose SOP Class UID has an unknown VR (found by fuzz/target_mime) is refused as that
    instance's failure (409, 0xC000); it used to escape the quick look at the part as a 500."""
    node = await make_central(LISTEN)
    data = testdata("CT_small.dcm")
    at = data.index(b"\x08\x00\x16\x00UI", 132 + 200)  # the dataset's (0008,0016), not the meta's
    bad = data[:at + 4] + b"U!" + data[at + 6:]
    response = await _stow(node, [("application/dicom", bad)])
    assert response.status_code == 409, response.text
    failed = response.json()["00081198"]["Value"]
    assert failed[0]["00081197"]["Value"] == [0xC000]
    assert await node.database.run(index.count_objects) == 0


@pytest_twisted.ensureDeferred
async def test_stow_with_too_many_parts_is_413_before_any_is_read(make_central):
    """A STOW-RS body of many empty parts (a million fit in 42 MB and took 75 s to split) is refused 413
    as soon as its parts pass ``[limits] max_stow_parts`` (10,000 by default); nothing is stored."""
    from medd.config import PartLimits

    node = await make_central(LISTEN)
    default = PartLimits().max_stow_parts
    response = await _stow(node, [("application/dicom", b"")] * (default + 1))
    assert response.status_code == 413
    assert response.headers["Content-Type"] == "application/problem+json"
    assert str(default) in response.json()["detail"]
    assert await node.database.run(index.count_objects) == 0


@pytest_twisted.ensureDeferred
async def test_stow_part_cap_is_the_configured_one(make_central):
    """``[limits] max_stow_parts = 2``: two instances are stored, three are 413 and none of them is."""
    node = await make_central(LISTEN, extra="[limits]\nmax_stow_parts = 2\n")
    names = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm")
    response = await _stow(node, [("application/dicom", testdata(n)) for n in names])
    assert response.status_code == 413, response.text
    assert "at most 2 instances" in response.json()["detail"]
    assert await node.database.run(index.count_objects) == 0
    response = await _stow(node, [("application/dicom", testdata(n)) for n in names[:2]])
    assert response.status_code == 200, response.text
    assert await node.database.run(index.count_objects) == 2


def _independently_valid(path) -> dict | None:
    """The true UIDs of a pydicom test file if it is a valid storage object, else None.

    Decided without medd: pydicom reads it as Part 10 with file meta and a
    transfer syntax, its SOP class is a storage class, its SOP/Study/Series
    Instance UIDs are present and valid, and it is not one of the files
    pydicom keeps truncated on purpose.
    """
    if "truncated" in path.name:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
        if ds.preamble is None or not ds.file_meta.get("TransferSyntaxUID"):
            return None
        uids = {k: str(ds.get(k) or "") for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
    except Exception:
        return None
    if not uids["SOPClassUID"].startswith(STORAGE_SOP_CLASS_PREFIX):
        return None
    if not all(UID(uids[k]).is_valid for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")):
        return None
    return uids


@pytest_twisted.ensureDeferred
async def test_pydicom_corpus_via_stow(make_central):
    """Every file in pydicom's bundled test data goes through STOW-RS: each valid storage object is
    found by QIDO-RS with its true Study, Series and SOP Instance UIDs, and every other file is refused.
    The corpus encodes some images several ways under one SOP Instance UID: after the first, each is
    a conflict (409, failure reason 0xA900), as any other content under a UID already held is."""
    node = await make_central(LISTEN)
    client = await _client(node)
    valid, invalid, wrong = [], [], []
    held: dict[str, bytes] = {}
    for path in all_testdata_files():
        expected = _independently_valid(path)
        data = path.read_bytes()
        response = await _stow(node, [("application/dicom", data)])
        if expected is not None:
            valid.append(path.name)
            first = held.setdefault(expected["SOPInstanceUID"], data)
            if first != data:
                answer = pydicom.Dataset.from_json(response.json())
                if response.status_code != 409 or answer.FailedSOPSequence[0].FailureReason != 0xA900:
                    wrong.append((path.name, "not a conflict", response.status_code, response.text[:300]))
                continue
            if response.status_code != 200:
                wrong.append((path.name, "refused", response.status_code, response.text[:300]))
                continue
            found = await deferToThread(
                client.search_for_instances, search_filters={"SOPInstanceUID": expected["SOPInstanceUID"]}
            )
            got = [pydicom.Dataset.from_json(i) for i in found]
            if [(i.StudyInstanceUID, i.SeriesInstanceUID, i.SOPInstanceUID) for i in got] != [
                (expected["StudyInstanceUID"], expected["SeriesInstanceUID"], expected["SOPInstanceUID"])
            ]:
                wrong.append((path.name, "not found with its UIDs", found))
        else:
            invalid.append(path.name)
            if response.status_code != 409 or "FailedSOPSequence" not in pydicom.Dataset.from_json(response.json()):
                wrong.append((path.name, "accepted", response.status_code))
    assert not wrong
    assert len(valid) > 100 and len(invalid) > 10
