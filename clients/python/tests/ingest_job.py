"""One bulk job, as a user runs it from a script: prints its summary as JSON (also after Ctrl-C,
then with exit status 130).
    python clients/python/tests/ingest_job.py SERVER INDEX FOLDER [MAX_RETRIES]
"""
import json
import sys

from imagelsh import Client

server, index, folder = sys.argv[1:4]
max_retries = int(sys.argv[4]) if len(sys.argv) > 4 else None
interrupted = False
with Client(server) as client:
    try:
        summary = client.ingest_folder(index, folder, batch_size=8, parallel=2, max_retries=max_retries)
    except KeyboardInterrupt as stopped:
        if not hasattr(stopped, "summary"):
            raise  # before the job began: nothing to report
        summary, interrupted = stopped.summary, True
print(json.dumps({"indexed": summary.indexed, "skipped": summary.skipped, "refused": len(summary.refused),
                  "remaining": summary.remaining, "retries": summary.retries, "seconds": summary.seconds,
                  "interrupted": interrupted}))
sys.exit(130 if interrupted else 0)
