"""What the client returns: plain dataclasses, not the generated messages."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass(frozen=True)
class IndexInfo:
    name: str
    dim: int
    hash_bits: int
    tables: int
    seed: int
    items: int
    model: str
    centered: bool
    stores_embeddings: bool
    sketch_bits: int
    thumbnails: bool

    @classmethod
    def from_proto(cls, info) -> "IndexInfo":
        return cls(info.name, info.dim, info.hash_bits, info.tables, info.seed, info.items, info.model,
                   info.centered, info.stores_embeddings, info.sketch_bits, info.thumbnails)


@dataclass(frozen=True)
class Hit:
    id: str
    label: str
    # Tables in which the item shares the query's bucket; score is votes / tables.
    votes: int
    score: float
    # Cosine similarity with the query when re-ranked (the default); 0 when ranked by votes.
    similarity: float
    metadata: Dict[str, str]


@dataclass(frozen=True)
class QueryResult:
    """The hits, best first, and how they were found. Iterating it iterates the hits."""

    hits: List[Hit]
    # Items the plan compared (TABLES: distinct bucket hits; SCAN: live items).
    candidates: int
    # "TABLES" or "SCAN".
    plan: str

    def __iter__(self):
        return iter(self.hits)

    def __len__(self):
        return len(self.hits)

    def __getitem__(self, i):
        return self.hits[i]


@dataclass(frozen=True)
class StoredItem:
    id: str
    label: str
    metadata: Dict[str, str]
    # Set when asked for (with_embeddings / with_thumbnails) and present.
    embedding: Optional[List[float]] = None
    thumbnail: Optional[bytes] = None


@dataclass(frozen=True)
class Refusal:
    """An item the job did not index, and why (the server's reason, or a local one)."""

    id: str
    source: str
    reason: str


@dataclass
class IngestSummary:
    """What a bulk job did. indexed + skipped + len(refused) + remaining = the items planned."""

    # Items acknowledged durable by the server in this run.
    indexed: int = 0
    # Items the index held already (resume), not sent again.
    skipped: int = 0
    refused: List[Refusal] = field(default_factory=list)
    # Items never acknowledged (the job was interrupted).
    remaining: int = 0
    # Retries of calls after transient failures (server away, busy).
    retries: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        """Items indexed per second."""
        return self.indexed / self.seconds if self.seconds > 0 else 0.0
