"""imagelsh: the Python client of the imagelsh image similarity service.

    from imagelsh import Client
    with Client("http://127.0.0.1:50051", token="...") as client:
        summary = client.ingest_folder("photos", "/data/photos")
        for hit in client.query("photos", open("cat.jpg", "rb").read(), top_k=5):
            print(hit.id, hit.label, hit.votes, round(hit.similarity, 3))
"""
from .client import Client
from .errors import (AlreadyExists, ImagelshError, ImagesRefused, InvalidArgument, NotFound, PermissionDenied,
                     Unauthenticated, Unavailable)
from .retry import Backoff
from .source import plan_folder
from .models import Hit, IndexInfo, IngestSummary, QueryResult, Refusal, StoredItem

__all__ = ["Client", "Backoff", "Hit", "IndexInfo", "IngestSummary", "QueryResult", "Refusal", "StoredItem",
           "ImagelshError", "AlreadyExists", "ImagesRefused", "InvalidArgument", "NotFound", "PermissionDenied",
           "Unauthenticated", "Unavailable", "plan_folder"]
