"""One bulk job, as a user runs it from a script: prints its summary as JSON.
    python clients/python/tests/ingest_job.py SERVER INDEX FOLDER [MAX_RETRIES]
"""
import json
import sys

from imagelsh import Client

server, index, folder = sys.argv[1:4]
max_retries = int(sys.argv[4]) if len(sys.argv) > 4 else None
with Client(server) as client:
    summary = client.ingest_folder(index, folder, batch_size=8, parallel=2, max_retries=max_retries)
print(json.dumps({"indexed": summary.indexed, "skipped": summary.skipped, "refused": len(summary.refused),
                  "remaining": summary.remaining, "retries": summary.retries, "seconds": summary.seconds}))
