"""The imagelsh client: a channel (plain or TLS) to each server it is given (replicas of one
store), with the bearer token on every call."""
import dataclasses
import json
import math
import queue
import threading
import time
from typing import Iterable, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import grpc

from .errors import AlreadyExists, ImagesRefused, NotFound, from_rpc_error
from .ingest import IngestJob, IngestOptions
from .retry import Backoff, is_retryable
from .source import SOURCE_KEY, plan_folder
from .stream import END, Batch, BatchFeed, StreamCounters, pump, rotating_opener
from .models import Hit, IndexInfo, IngestSummary, QueryResult, Refusal, StoredItem
from .v1 import imagelsh_pb2 as pb
from .v1 import imagelsh_pb2_grpc as pb_grpc

# As large as the server's default --max-message-bytes.
MAX_MESSAGE_BYTES = 64 << 20
_PLANS = {"auto": pb.SEARCH_PLAN_AUTO, "tables": pb.SEARCH_PLAN_TABLES, "scan": pb.SEARCH_PLAN_SCAN}


def _read_pem(value: Union[None, str, bytes]) -> Optional[bytes]:
    """PEM bytes as given, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as file:
        return file.read()


def _split_servers(url: Union[str, Sequence[str]]) -> List[str]:
    """The servers a client is given: one URL, several comma-separated, or a list."""
    parts = url.split(",") if isinstance(url, str) else [part for item in url for part in str(item).split(",")]
    servers = [part.strip() for part in parts if part.strip()]
    if not servers:
        raise ValueError(f"{url!r}: no server given")
    return servers


def _target(url: str) -> Tuple[str, bool]:
    """host:port for a server's URL, and whether it is TLS (https)."""
    parsed = urlparse(url if "://" in url else "http://" + url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{url!r}: expected http://host:port or https://host:port")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return f"{host}:{port}", parsed.scheme == "https"


class Client:
    """A client of the server at `url` (http://host:port, or https://host:port for TLS).

    `url` may name several servers, comma-separated or as a list: replicas that share one
    index store (`imagelsh serve --store redis://…`). `ingest_folder` spreads its streams over
    all of them (stream i starts on server i mod n; a broken stream is sent again through the
    next one). Other calls go to the first server; one that answers UNAVAILABLE is left for
    the next one (the calls after it stay there until it fails in turn).

    `token` is sent as `authorization: Bearer …` with every call. For TLS, `ca_cert` (a PEM
    path or bytes; default: the system's CAs), `client_cert` and `client_key` for a server that
    requires client certificates, `server_name` when the certificate names another host (the
    same for every server). Unary calls are retried through a restarting or busy server by
    `backoff`.
    """

    def __init__(self, url: Union[str, Sequence[str]] = "http://127.0.0.1:50051", token: Optional[str] = None, *,
                 ca_cert=None, client_cert=None, client_key=None, server_name: Optional[str] = None,
                 backoff: Backoff = Backoff(), timeout: Optional[float] = None):
        self.servers = _split_servers(url)
        # Reconnects after a server restart as soon as the retries (backoff) ask, not after
        # gRPC's own longer reconnect backoff (up to 120 s).
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.initial_reconnect_backoff_ms", int(backoff.first * 1000)),
                   ("grpc.min_reconnect_backoff_ms", int(backoff.first * 1000)),
                   ("grpc.max_reconnect_backoff_ms", int(backoff.max * 1000))]
        tls_options = options + ([("grpc.ssl_target_name_override", server_name)] if server_name else [])
        targets = [_target(server) for server in self.servers]
        credentials = None
        if any(secure for _target_, secure in targets):
            credentials = grpc.ssl_channel_credentials(root_certificates=_read_pem(ca_cert),
                                                       private_key=_read_pem(client_key),
                                                       certificate_chain=_read_pem(client_cert))
        elif ca_cert or client_cert or client_key:
            raise ValueError("TLS files were given for a plain http:// server")
        self._channels = [grpc.secure_channel(target, credentials, tls_options) if secure
                          else grpc.insecure_channel(target, options) for target, secure in targets]
        self._stubs = [pb_grpc.ImageIndexStub(channel) for channel in self._channels]
        # The server unary calls go to: the first, then the next after each UNAVAILABLE.
        self._current = 0
        self._rotate_lock = threading.Lock()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.backoff, self.timeout = backoff, timeout

    def close(self):
        for channel in self._channels:
            channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method: str, request):
        """A unary call (`method`, the stub's name for it), retried (backoff with jitter, or the
        server's retry-after) while the server is away or busy; a server that is away
        (UNAVAILABLE) is left for the next one, where there are several."""
        attempt = 0
        while True:
            server = self._current
            try:
                return getattr(self._stubs[server % len(self._stubs)], method)(
                    request, metadata=self._metadata, timeout=self.timeout)
            except grpc.RpcError as error:
                if not is_retryable(error) or attempt >= self.backoff.retries:
                    raise from_rpc_error(error) from None
                if error.code() == grpc.StatusCode.UNAVAILABLE and len(self._stubs) > 1:
                    # Only from the server this call used: a concurrent call moved it already.
                    with self._rotate_lock:
                        if self._current == server:
                            self._current = (server + 1) % len(self._stubs)
                time.sleep(self.backoff.delay_after(attempt, error))
                attempt += 1

    # Indexes.

    def create_index(self, name: str, *, dim: int = 0, hash_bits: int = 0, tables: int = 0, seed: int = 0,
                     thumbnails: bool = False, store_embeddings: Optional[bool] = None, sketch_bits: int = 0,
                     center: Optional[Sequence[float]] = None, no_center: bool = False) -> IndexInfo:
        """Creates an index (0 means the server's default for each number). AlreadyExists if
        the name is taken."""
        request = pb.CreateIndexRequest(name=name, dim=dim, hash_bits=hash_bits, tables=tables, seed=seed,
                                        thumbnails=thumbnails, sketch_bits=sketch_bits,
                                        center=list(center or ()), no_center=no_center)
        if store_embeddings is not None:
            request.store_embeddings = store_embeddings
        return IndexInfo.from_proto(self._call("CreateIndex", request))

    def get_index(self, name: str) -> IndexInfo:
        """NotFound for an unknown index."""
        return IndexInfo.from_proto(self._call("GetIndex", pb.GetIndexRequest(name=name)))

    def list_indexes(self) -> List[IndexInfo]:
        response = self._call("ListIndexes", pb.ListIndexesRequest())
        return [IndexInfo.from_proto(info) for info in response.indexes]

    def drop_index(self, name: str):
        self._call("DropIndex", pb.DropIndexRequest(name=name))

    # Items.

    def get_items(self, index: str, ids: Sequence[str], *, with_embeddings: bool = False,
                  with_thumbnails: bool = False) -> Tuple[List[StoredItem], List[str]]:
        """The stored items with these ids (at most the server's --max-batch-items), and the
        ids the index does not hold."""
        request = pb.GetItemsRequest(index=index, ids=list(ids), with_embeddings=with_embeddings,
                                     with_thumbnails=with_thumbnails)
        response = self._call("GetItems", request)
        found = [StoredItem(item.id, item.label, dict(item.metadata),
                            list(item.embedding.values) if item.HasField("embedding") else None,
                            item.thumbnail or None) for item in response.items]
        return found, list(response.missing)

    def delete(self, index: str, ids: Sequence[str]) -> int:
        """Removes the items; returns how many were there."""
        return self._call("Delete", pb.DeleteRequest(index=index, ids=list(ids))).deleted

    # Queries.

    def query(self, index: str, query: Union[bytes, str, Sequence[float], None] = None, *,
              image: Optional[bytes] = None, embedding: Optional[Sequence[float]] = None,
              id: Optional[str] = None, top_k: int = 10, min_votes: int = 0, probes: Optional[int] = None,
              rerank: Optional[bool] = None, rerank_depth: int = 0, plan: str = "auto") -> QueryResult:
        """The items most similar to an image (bytes), a stored item (its id, a str) or an
        embedding (a sequence of floats): `query` takes any of the three, or name it with
        image=, id= or embedding=."""
        given = [value for value in (query, image, embedding, id) if value is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of: an image (bytes), an id (str) or an embedding")
        request = pb.QueryRequest(index=index, top_k=top_k, min_votes=min_votes, rerank_depth=rerank_depth)
        if plan not in _PLANS:
            raise ValueError(f"plan must be one of {sorted(_PLANS)}")
        request.plan = _PLANS[plan]
        if probes is not None:
            request.probes = probes
        if rerank is not None:
            request.rerank = rerank
        if image is not None or (embedding is None and id is None and isinstance(query, (bytes, bytearray, memoryview))):
            request.image = bytes(given[0])
        elif id is not None or isinstance(query, str):
            request.id = given[0]
        else:
            values = [float(v) for v in given[0]]
            if not all(math.isfinite(v) for v in values):
                raise ValueError("the embedding holds a value that is not finite")
            request.embedding.values.extend(values)
        response = self._call("Query", request)
        hits = [Hit(h.id, h.label, h.votes, h.score, h.similarity, dict(h.metadata)) for h in response.hits]
        plan_name = pb.SearchPlan.Name(response.plan).replace("SEARCH_PLAN_", "")
        return QueryResult(hits, response.candidates, plan_name)

    # Embeddings.

    def embed(self, images: Iterable[bytes], *, batch_size: int = 32, max_in_flight: int = 4) -> List[List[float]]:
        """The embeddings of encoded images (JPEG, PNG, WebP), in order, without indexing them.
        Raises ImagesRefused (with the others' embeddings) when the server refuses some."""
        if batch_size < 1 or max_in_flight < 1:
            raise ValueError("batch_size and max_in_flight must be at least 1")
        images = [bytes(image) for image in images]
        if not images:
            return []
        embeddings: List[Optional[List[float]]] = [None] * len(images)
        refused: List[Refusal] = []
        # Every batch is in memory already: the feed's source holds them all from the start.
        source = queue.Queue()
        for batch_id, start in enumerate(range(0, len(images), batch_size)):
            chunk = images[start:start + batch_size]
            source.put(Batch(batch_id, pb.EmbedRequest(batch_id=batch_id, images=chunk), start))
        source.put(END)

        def acknowledged(batch: Batch, response):
            start = batch.payload
            failed = {error.position: error.message for error in response.errors}
            vectors = iter(response.embeddings)
            for position in range(len(batch.request.images)):
                if position in failed:
                    refused.append(Refusal(str(start + position), "", failed[position]))
                    next(vectors, None)
                else:
                    vector = next(vectors, None)
                    embeddings[start + position] = list(vector.values) if vector is not None else None

        lock, calls = threading.Lock(), set()
        pump(rotating_opener(self._stubs, "Embed", self._metadata, first=self._current), BatchFeed(source),
             max_in_flight, acknowledged, self.backoff, threading.Event(), StreamCounters(), lock, calls)
        if refused:
            raise ImagesRefused(refused, embeddings)
        return embeddings

    # Bulk ingest.

    def ingest_folder(self, index: str, folder: str, *, batch_size: int = 64, parallel: int = 4,
                      max_in_flight: int = 4, max_retries: Optional[int] = None, resume: bool = True,
                      create: bool = True, thumbnails: bool = True, progress: bool = True,
                      refused_file: Optional[str] = None, readers: int = 2,
                      max_batch_bytes: int = 4 << 20, max_item_bytes: int = 32 << 20) -> IngestSummary:
        """Indexes every image under `folder` (recursively; the label is the first sub-folder's
        name, the id the path below `folder`, metadata["source"] the file) over `parallel`
        streams with `max_in_flight` unacknowledged batches of `batch_size` each, reading files
        while sending. Retries through a server that restarts or is busy (`max_retries` in a
        row, backoff with jitter, or the server's retry-after). With `resume`, items whose ids
        the index holds already are skipped, so a rerun of an interrupted job finishes it.
        Creates a missing index (with thumbnails) unless `create` is False. Refused items are
        in the summary, and written as JSON lines to `refused_file` when given."""
        summary = IngestSummary()
        items = plan_folder(folder)
        self._ensure_index(index, create, thumbnails)
        if resume and items:
            held = self._held_ids(index, [item.id for item in items], batch_size)
            summary.skipped = len(held)
            items = [item for item in items if item.id not in held]
        backoff = self.backoff if max_retries is None else dataclasses.replace(self.backoff, retries=max_retries)
        options = IngestOptions(batch_size=batch_size, max_batch_bytes=max_batch_bytes, parallel=parallel,
                                max_in_flight=max_in_flight, readers=readers, max_item_bytes=max_item_bytes,
                                backoff=backoff, progress=progress)
        try:
            IngestJob(self._stubs, self._metadata, index, items, options, summary).run()
        finally:
            if refused_file is not None and summary.refused:
                with open(refused_file, "w") as out:
                    for refusal in summary.refused:
                        out.write(json.dumps({"id": refusal.id, SOURCE_KEY: refusal.source,
                                              "reason": refusal.reason}) + "\n")
        return summary

    def _ensure_index(self, index: str, create: bool, thumbnails: bool):
        try:
            self.get_index(index)
        except NotFound:
            if not create:
                raise
            try:
                self.create_index(index, thumbnails=thumbnails)
            except AlreadyExists:
                pass  # created meanwhile, by another job or by a retried call that had landed

    def _held_ids(self, index: str, ids: List[str], chunk: int) -> set:
        """The ids the index holds already, asked for `chunk` at a time."""
        held = set()
        for start in range(0, len(ids), chunk):
            found, _missing = self.get_items(index, ids[start:start + chunk])
            held.update(item.id for item in found)
        return held

