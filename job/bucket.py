"""Backups in an S3-compatible bucket (MIGRATE_BACKUP_DIR=s3://bucket/prefix).

pg_dump writes to a pipe; we compress its output (job.compression), cut it into parts, hash it on the way and send each part
(with its own SHA-256, which the server checks) to a multipart upload while pg_dump goes on. An
object appears under its name only when the upload completes, so an interrupted backup leaves
nothing there: we abort the upload, and a bucket lifecycle rule (README) clears what a SIGKILL
leaves. `pg_restore --list` reads the table of contents as the archive streams; once the upload
is complete, the stored size and checksum are compared with what was sent (so the stored archive
is the one whose table of contents read) before anything migrates.

Credentials come from the standard AWS chain (environment, web identity, container and instance
profiles, config files): never from the URL. The endpoint is AWS_ENDPOINT_URL, the region
AWS_REGION (or AWS_DEFAULT_REGION); MIGRATE_S3_ADDRESSING picks path-style or virtual-hosted
addressing. boto3 loads only here, when a command touches the bucket.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import queue
import subprocess
import tempfile
import threading
from typing import Any, Callable, Iterator, Mapping, NamedTuple

from job import archive, compression
from job.config import S3_SCHEME as SCHEME, S3Location as Location
from job.errors import BackupFailed, ConfigError, DumpExited
from job.logs import log

# S3 takes at most 10,000 parts, each but the last at least 5 MiB. Two parts are in memory at a
# time (one filling, one sending): 8 MiB parts keep the job under 100 MiB; past 5,000 parts (39 GiB)
# they grow to 16 MiB, which lets one backup reach 117 GiB.
PART = 8 << 20
MAX_PARTS = 10_000
CHUNK = 1 << 20


def part_size(number: int) -> int:
    """The size of part `number` (from 1): see PART."""
    return PART if number <= MAX_PARTS // 2 else 2 * PART


class Bucket:
    """A backup store in a bucket: the operations job.backup needs, each one a request or two."""

    def __init__(self, location: Location, env: Mapping[str, str], addressing: str = "auto") -> None:
        self.location = location
        self._env = env
        self._addressing = addressing
        self._client: Any = None

    def __str__(self) -> str:
        return str(self.location)

    def path_of(self, name: str) -> str:
        return str(self.location) + name

    def locate(self, given: str) -> tuple[Bucket, str]:
        """The store and name of the backup an operator names: a name, or the path `backup --list` shows."""
        if given.startswith(SCHEME):
            if not given.startswith(str(self.location)):
                raise BackupFailed(f"backup {given!r} is not in {self.location} (MIGRATE_BACKUP_DIR)")
            given = given[len(str(self.location)):]
        if not given or "/" in given:
            raise BackupFailed(f"no backup {given!r} in {self.location}: give a name that `backup --list` shows")
        return self, given

    # --- what job.backup asks of a store --------------------------------------------------------

    def ready(self) -> None:
        """Nothing to check before a request: the first one tells a missing bucket or a refusal."""

    def names(self) -> list[str]:
        """The objects directly under the prefix."""
        found = []
        pages = self._paginate("list_objects_v2", Bucket=self.location.bucket, Prefix=self.location.prefix,
                               Delimiter="/")
        for page in pages:
            found.extend(item["Key"][len(self.location.prefix):] for item in page.get("Contents", ()))
        return found

    def read(self, name: str) -> bytes | None:
        try:
            response = self._call("get_object", Bucket=self.location.bucket, Key=self.location.key(name))
        except _Missing:
            return None
        with contextlib.closing(response["Body"]) as body:
            return body.read()

    def write(self, name: str, content: bytes) -> None:
        """One PUT: S3 shows the whole object or none of it."""
        self._call("put_object", Bucket=self.location.bucket, Key=self.location.key(name), Body=content,
                   ContentType="application/json", ChecksumSHA256=_b64(hashlib.sha256(content).digest()))

    def delete(self, name: str) -> None:
        self._call("delete_object", Bucket=self.location.bucket, Key=self.location.key(name))

    def free_space(self) -> int | None:
        """A bucket has no room to run out of."""
        return None

    def size(self, name: str) -> int | None:
        try:
            return int(self._call("head_object", Bucket=self.location.bucket, Key=self.location.key(name))["ContentLength"])
        except _Missing:
            return None

    @contextlib.contextmanager
    def chunks(self, name: str) -> Iterator[Iterator[bytes]]:
        """The object's bytes, streamed."""
        try:
            response = self._call("get_object", Bucket=self.location.bucket, Key=self.location.key(name))
        except _Missing:
            raise BackupFailed(f"no backup {self.path_of(name)!r}") from None
        with contextlib.closing(response["Body"]) as body:
            yield self._guarded(body.iter_chunks(CHUNK))

    def remove_partials(self, matches: Callable[[str], bool]) -> None:
        """Abort the unfinished uploads of backups `matches` accepts: a dead run's (under the lock no
        other job writes one of them). Where listing uploads is not allowed, the lifecycle rule clears them."""
        try:
            pages = list(self._paginate("list_multipart_uploads", Bucket=self.location.bucket,
                                        Prefix=self.location.prefix))
        except Refused as e:
            log.warning("backup.partials_unchecked", location=str(self.location), error=str(e))
            return
        for page in pages:
            for upload in page.get("Uploads", ()):
                name = upload["Key"][len(self.location.prefix):]
                if "/" not in name and matches(name):
                    self._abort(upload["Key"], upload["UploadId"])
                    log.warning("backup.partial_removed", path=self.path_of(name))

    def dump(self, name: str, argv: list[str], env: Mapping[str, str], spawn: Callable[..., subprocess.Popen],
             pg_restore: str, prepare: Callable[[], None], method: compression.Method) -> archive.Read:
        """Stream pg_dump's output (`argv` writes to stdout), compressed by `method`, into the object
        `name`, then check the stored object (`_check_stored`). pg_dump failing raises DumpExited,
        nothing left behind."""
        with tempfile.TemporaryFile() as stderr:
            dumper = archive.spawn_dump(spawn, argv, env, stderr)
            dumped = archive.Dumped(dumper.stdout, method, pg_restore, env)
            parts = Parts(dumped)
            upload = None
            try:
                # boto3 loads, `prepare` runs and the upload starts while pg_dump connects and reads
                # the catalog, and its first parts are read: pg_dump never waits for us to start
                prepare()
                upload = Upload(self, self.location.key(name))
                upload.send(parts)
                returncode = dumper.wait()
                if returncode != 0:
                    raise DumpExited(returncode, archive.written(stderr))
                upload.complete()
            except BaseException:
                if upload is not None:
                    upload.abort()
                raise
            finally:
                if dumper.poll() is None:
                    dumper.kill()
                dumper.wait()
                parts.close()
                dumper.stdout.close()
                dumped.close()
        try:
            self._check_stored(name, parts.sent)
            return archive.Read(parts.sent.size, parts.sent.sha256, parts.listing)
        except BaseException:
            with contextlib.suppress(BackupFailed):
                self.delete(name)
            raise

    # --- the client --------------------------------------------------------------------------------

    def client(self) -> Any:
        if self._client is None:
            self._client = _client(self._env, self._addressing)
        return self._client

    def _call(self, operation: str, **params: Any) -> Any:
        with self._errors(operation):
            return getattr(self.client(), operation)(**params)

    def _paginate(self, operation: str, **params: Any) -> Iterator[Any]:
        with self._errors(operation):
            yield from self.client().get_paginator(operation).paginate(**params)

    def _guarded(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        with self._errors("get_object"):
            yield from chunks

    def _abort(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(_Missing):
            self._call("abort_multipart_upload", Bucket=self.location.bucket, Key=key, UploadId=upload_id)

    @contextlib.contextmanager
    def _errors(self, operation: str) -> Iterator[None]:
        """botocore's exceptions as ours, each saying what to check."""
        try:
            yield
        except Exception as e:
            endpoint = self._client.meta.endpoint_url if self._client is not None else "the endpoint"
            raise _translated(e, operation, self.location, endpoint) from None

    def _check_stored(self, name: str, sent: Sent) -> None:
        """The stored object is what we sent (so its table of contents reads, as what we sent did):
        its size, and its SHA-256: the server's composite of the parts' checksums where it keeps
        one, else the object read back and hashed."""
        try:
            head = self._call("head_object", Bucket=self.location.bucket, Key=self.location.key(name),
                              ChecksumMode="ENABLED")
        except _Missing:
            raise BackupFailed(f"the backup {self.path_of(name)!r} is not in the bucket after its upload completed") from None
        if int(head["ContentLength"]) != sent.size:
            raise BackupFailed(f"the stored backup {self.path_of(name)!r} holds {head['ContentLength']} bytes, "
                               f"{sent.size} were sent")
        stored = head.get("ChecksumSHA256")
        if stored:
            matches = stored.split("-")[0] == sent.composite
        else:
            with self.chunks(name) as chunks:
                matches = archive.Hashed(chunks).rest() == sent.sha256
        if not matches:
            raise BackupFailed(f"the stored backup {self.path_of(name)!r} does not match the sha256 of what was sent")


class Sent(NamedTuple):
    """What went into an upload: its size, sha256, and the composite checksum S3 keeps of the parts'."""

    size: int
    sha256: str
    composite: str


class Parts:
    """An archive's stored bytes (an archive.Dumped) cut into upload parts by a thread of its own,
    each part hashed on the way. Two part buffers at most, one filling while the other is sent:
    memory stays at two parts whatever the dump's size, and pg_dump waits (its pipe full) only
    while both are taken."""

    def __init__(self, dumped: archive.Dumped) -> None:
        self.dumped = dumped
        self.sent: Sent | None = None  # once the stream ended
        self.listing = ""  # the archive's table of contents, once the stream ended
        self._buffers = threading.Semaphore(2)
        self._queue: queue.Queue[tuple[int, bytearray, bytes] | None | BaseException] = queue.Queue()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="parts", daemon=True)
        self._reader.start()

    def __iter__(self) -> Iterator[tuple[int, bytearray, bytes]]:
        """(number, bytes, sha256) of each part in turn; a part's buffer is reused once the next is asked for."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            self._buffers.release()

    def close(self) -> None:
        """Stop reading (pg_dump is gone by now: the stream ends)."""
        self._closed.set()
        self._buffers.release()
        self._reader.join(timeout=5)

    def _read(self) -> None:
        part_hashes: list[bytes] = []
        chunks = iter(self.dumped)
        carry = b""  # what the last chunk held beyond the part it completed
        try:
            for number in itertools.count(1):
                self._buffers.acquire()
                if self._closed.is_set():
                    return
                part, carry = _filled(chunks, carry, part_size(number))
                if not part:
                    break
                if number > MAX_PARTS:
                    raise BackupFailed(f"the dump is larger than one S3 upload of {MAX_PARTS} parts holds "
                                       f"({sum(part_size(n) for n in range(1, number))} bytes so far)")
                part_hashes.append(hashlib.sha256(part).digest())
                self._queue.put((number, part, part_hashes[-1]))
                if len(part) < part_size(number):
                    break
            read = self.dumped.read()
            self.listing = read.listing
            composite = _b64(hashlib.sha256(b"".join(part_hashes)).digest())
            self.sent = Sent(read.size, read.sha256, composite)
            self._queue.put(None)
        except BaseException as e:  # the sender raises it
            self._queue.put(e)


class Upload:
    """One multipart upload, with the parts' own checksums (SHA-256), which the server checks."""

    def __init__(self, bucket: Bucket, key: str) -> None:
        self.bucket, self.key = bucket, key
        created = bucket._call("create_multipart_upload", Bucket=bucket.location.bucket, Key=key,
                               ChecksumAlgorithm="SHA256", ContentType="application/octet-stream")
        self.upload_id: str = created["UploadId"]
        self.parts: list[dict[str, Any]] = []

    def send(self, parts: Parts) -> None:
        for number, part, sha256 in parts:
            checksum = _b64(sha256)
            sent = self.bucket._call("upload_part", Bucket=self.bucket.location.bucket, Key=self.key,
                                     UploadId=self.upload_id, PartNumber=number, Body=part, ChecksumSHA256=checksum)
            self.parts.append({"PartNumber": number, "ETag": sent["ETag"], "ChecksumSHA256": checksum})

    def complete(self) -> None:
        self.bucket._call("complete_multipart_upload", Bucket=self.bucket.location.bucket, Key=self.key,
                          UploadId=self.upload_id, MultipartUpload={"Parts": self.parts})

    def abort(self) -> None:
        """Abort the upload, so that no part stays stored; where the bucket cannot be reached, say
        what will clear it."""
        try:
            self.bucket._abort(self.key, self.upload_id)
        except BackupFailed as e:
            log.warning("backup.upload_not_aborted", key=self.key, error=str(e),
                        hint="the bucket's lifecycle rule (AbortIncompleteMultipartUpload) removes it")


class _Missing(Exception):
    """The object (or upload) is not there."""


class Refused(BackupFailed):
    """The bucket refused a request (HTTP 403): the credentials lack a permission."""


def _filled(chunks: Iterator[bytes], carry: bytes, size: int) -> tuple[bytearray, bytes]:
    """A part of up to `size` bytes, from `carry` and then `chunks`, and what is left of the chunk
    that completed it: fewer only at the end of the stream."""
    part = bytearray(carry[:size])
    carry = carry[size:]
    while len(part) < size and not carry:
        chunk = next(chunks, None)
        if chunk is None:
            break
        room = size - len(part)
        part += chunk[:room]
        carry = chunk[room:]
    return part, carry


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _client(env: Mapping[str, str], addressing: str) -> Any:
    """An S3 client from the standard AWS chain, with timeouts a job can live with."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError("backups in s3:// need boto3: install migrate-job[s3] (the image has it)") from None
    retries = None if env.get("AWS_MAX_ATTEMPTS") or env.get("AWS_RETRY_MODE") else {"mode": "standard",
                                                                                        "max_attempts": 3}
    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries=retries,
        s3={"addressing_style": addressing},
        user_agent_extra="migrate-job",
    )
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
    return boto3.session.Session(region_name=region).client("s3", config=config)


def _translated(error: Exception, operation: str, location: Location, endpoint: str) -> Exception:
    """What went wrong talking to the bucket, as one line that says what to check. Never the
    credentials: botocore's messages carry none, and nor do ours."""
    try:
        from botocore import exceptions as boto
    except ImportError:
        return error
    if isinstance(error, boto.NoCredentialsError):
        return BackupFailed(f"no AWS credentials for {location}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                            "or give the pod a web identity (IRSA, Workload Identity) or an instance profile")
    if isinstance(error, boto.ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = error.response.get("Error", {}).get("Message") or code
        if code in ("NoSuchKey", "NoSuchUpload", "404") and operation != "list_objects_v2":
            return _Missing(code)
        if code == "NoSuchBucket" or (status == 404 and operation == "list_objects_v2"):
            return BackupFailed(f"bucket {location.bucket!r} does not exist at {endpoint} "
                                f"(MIGRATE_BACKUP_DIR={location}, AWS_ENDPOINT_URL)")
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return Refused(f"{location} refused {operation} ({code}: {message}): the credentials need "
                           "s3:ListBucket, s3:GetObject, s3:PutObject, s3:DeleteObject, "
                           "s3:AbortMultipartUpload and s3:ListBucketMultipartUploads on it")
        return BackupFailed(f"{operation} on {location} failed: {code} {message}".strip())
    if isinstance(error, (boto.EndpointConnectionError, boto.ConnectTimeoutError, boto.ConnectionClosedError,
                          boto.ReadTimeoutError, boto.ResponseStreamingError)):
        return BackupFailed(f"the S3 endpoint did not answer {operation} for {location}: {error}")
    if isinstance(error, boto.BotoCoreError):
        return BackupFailed(f"{operation} on {location} failed: {error}")
    return error
