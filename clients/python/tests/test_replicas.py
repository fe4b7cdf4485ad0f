"""A folder ingested through two replicas of one cluster store (`imagelsh serve --store
redis://…`, the model loaded), the second SIGSTOPped then SIGKILLed mid-job: the job's streams
on it move to the first, and every image ends up indexed once, read back through the first.
    python clients/python/tests/test_replicas.py SERVER_A SERVER_B FOLDER PID_B
SERVER_A/B: http://host:port; FOLDER: images (class sub-folders; unreadable files are counted
as refused); PID_B: the process of SERVER_B, killed by this script. The index "replicas" is
dropped first if it exists. Prints its figures as one JSON line on stdout (the last line);
exit status 0 when every check passes, 1 when one fails (the reason on stderr), 2 for bad
arguments.
"""
import json
import os
import signal
import sys
import threading
import time

from imagelsh import Backoff, Client, NotFound, plan_folder

INDEX = "replicas"
# The job is killed once this share of the folder is indexed.
KILL_AT = 0.25
JOB_LIMIT_S = 600.0


def fail(message: str):
    print(f"test_replicas: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def items_in(client: Client) -> int:
    try:
        return client.get_index(INDEX).items
    except NotFound:
        return 0


def main():
    if len(sys.argv) != 5 or not sys.argv[4].isdigit():
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    server_a, server_b, folder, pid_b = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    planned = {item.id: item.label for item in plan_folder(folder)}
    if len(planned) < 8:
        fail(f"{folder}: {len(planned)} images, too few for a job to be killed in the middle")
    try:
        os.kill(pid_b, 0)  # there, and ours to kill
    except OSError as error:
        fail(f"PID_B {pid_b}: {error}")

    with Client(server_a) as a, Client(server_b) as b:
        a.list_indexes()
        b.list_indexes()  # both answer before the job
        try:
            a.drop_index(INDEX)
        except NotFound:
            pass

    outcome = {}

    def job():
        try:
            with Client([server_a, server_b], backoff=Backoff(first=0.1, max=2.0, retries=10)) as both:
                outcome["summary"] = both.ingest_folder(INDEX, folder, batch_size=4, parallel=4, max_in_flight=2,
                                                        progress=False)
        except BaseException as error:  # noqa: B902 - reported below
            outcome["error"] = error

    runner = threading.Thread(target=job, daemon=True)
    started = time.monotonic()
    runner.start()
    with Client(server_a) as a:
        threshold = max(1, int(len(planned) * KILL_AT))
        while runner.is_alive() and items_in(a) < threshold:
            time.sleep(0.05)
        if not runner.is_alive():
            fail(f"the job ended before {threshold} items were indexed: {outcome}")
        # Stopped first: its streams hold their batches, so the job cannot finish before the kill.
        os.kill(pid_b, signal.SIGSTOP)
        time.sleep(0.5)
        at_kill = items_in(a)
        os.kill(pid_b, signal.SIGKILL)
        killed_after = time.monotonic() - started
        runner.join(JOB_LIMIT_S)
        if runner.is_alive():
            fail(f"the job did not end within {JOB_LIMIT_S:.0f} s of the kill")
        if "error" in outcome:
            error = outcome["error"]
            fail(f"the job raised {error!r}; summary {getattr(error, 'summary', None)}")
        summary = outcome["summary"]
        refused = {refusal.id for refusal in summary.refused}
        expected = {id: label for id, label in planned.items() if id not in refused}
        held = items_in(a)
        found, missing = {}, []
        ids = sorted(planned)
        for start in range(0, len(ids), 64):
            got, gone = a.get_items(INDEX, ids[start:start + 64])
            found.update((item.id, item.label) for item in got)
            missing.extend(gone)

    # The first server named is the dead one: unary calls move on to the live one.
    moved = time.monotonic()
    with Client(f"{server_b},{server_a}", backoff=Backoff(first=0.1, max=1.0, retries=5)) as dead_first:
        through_failover = dead_first.get_index(INDEX).items
    moved = time.monotonic() - moved

    figures = {"planned": len(planned), "indexed": summary.indexed, "skipped": summary.skipped,
               "refused": len(refused), "remaining": summary.remaining, "retries": summary.retries,
               "items_at_kill": at_kill, "killed_after_s": round(killed_after, 2),
               "items_via_a": held, "items_via_failover": through_failover, "failover_s": round(moved, 2),
               "seconds": round(summary.seconds, 2), "rate": round(summary.rate, 1)}
    print(json.dumps(figures))
    sys.stdout.flush()
    if summary.retries < 1:
        fail("the job saw no stream break")
    if at_kill >= len(expected):
        fail("everything was indexed before the kill")
    if summary.remaining != 0 or summary.skipped != 0:
        fail(f"remaining {summary.remaining}, skipped {summary.skipped}")
    if summary.indexed != len(expected) or summary.indexed + len(refused) != len(planned):
        fail(f"indexed {summary.indexed} (each batch acknowledged once), {len(expected)} expected")
    if missing != sorted(refused) or found != expected:
        fail(f"read back through {server_a}: missing {sorted(set(missing) - refused)[:5]}, "
             f"wrong labels {[i for i in found if found[i] != expected.get(i)][:5]}")
    if held != len(expected) or through_failover != len(expected):
        fail(f"the index holds {held} items ({through_failover} through the failover), {len(expected)} expected")


if __name__ == "__main__":
    main()
