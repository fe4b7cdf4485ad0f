"""The client's pure parts, without a server: backoff, retry-after, folder planning, the feed
of batches that failed streams hand back, and argument checks.
    python clients/python/tests/test_units.py
"""
import os
import queue
import tempfile
import unittest

import grpc

from imagelsh import Backoff, Client, plan_folder
from imagelsh.retry import is_retryable, retry_after
from imagelsh.stream import END, Batch, BatchFeed, rotating_opener


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, trailers=()):
        self._code, self._trailers = code, tuple(trailers)

    def code(self):
        return self._code

    def details(self):
        return "fake"

    def trailing_metadata(self):
        return self._trailers


class BackoffTest(unittest.TestCase):
    def test_doubles_within_its_jitter_and_stops_at_the_cap(self):
        backoff = Backoff(first=0.1, max=2.0, retries=5)
        self.assertAlmostEqual(backoff.delay(0, 0.0), 0.05)
        self.assertAlmostEqual(backoff.delay(0, 0.999999), 0.1, places=5)
        self.assertAlmostEqual(backoff.delay(3, 0.0), 0.4)
        self.assertAlmostEqual(backoff.delay(30, 0.999999), 2.0, places=5)
        for attempt in range(8):
            wait = backoff.delay(attempt)
            full = min(0.1 * 2 ** attempt, 2.0)
            self.assertTrue(full / 2 <= wait <= full, (attempt, wait))

    def test_retry_after_is_read_bounded_and_honoured(self):
        busy = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, [("retry-after", "1.5")])
        self.assertEqual(retry_after(busy), 1.5)
        self.assertEqual(Backoff(max=1.0).delay_after(0, busy), 1.0)
        self.assertIsNone(retry_after(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED)))
        self.assertIsNone(retry_after(FakeRpcError(grpc.StatusCode.UNAVAILABLE, [("retry-after", "soon")])))
        self.assertIsNone(retry_after(FakeRpcError(grpc.StatusCode.UNAVAILABLE, [("retry-after", "-3")])))

    def test_only_transient_codes_are_retried(self):
        for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED):
            self.assertTrue(is_retryable(FakeRpcError(code)), code)
        for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED,
                     grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INTERNAL):
            self.assertFalse(is_retryable(FakeRpcError(code)), code)


class PlanFolderTest(unittest.TestCase):
    def test_ids_labels_and_sources_follow_the_rust_client(self):
        with tempfile.TemporaryDirectory() as root:
            for path in ("cats/b.png", "cats/a.JPG", "dogs/x/y.webp", "top.jpeg", "notes.txt", "cats/c"):
                os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
                open(os.path.join(root, path), "wb").close()
            items = plan_folder(root)
            self.assertEqual([(i.id, i.label) for i in items],
                             [("cats/a.JPG", "cats"), ("cats/b.png", "cats"), ("dogs/x/y.webp", "dogs"),
                              ("top.jpeg", "")])
            self.assertEqual(items[1].metadata, {"source": os.path.join(root, "cats", "b.png")})
            with self.assertRaises(NotADirectoryError):
                plan_folder(os.path.join(root, "top.jpeg"))


class BatchFeedTest(unittest.TestCase):
    def test_batches_handed_back_go_out_first_oldest_first_then_the_source_until_its_end(self):
        source = queue.Queue()
        for n in range(3):
            source.put(Batch(n, None, None))
        source.put(END)
        feed = BatchFeed(source)
        never = lambda: False  # noqa: E731
        first, second = feed.take(never), feed.take(never)
        feed.hand_back([first, second])
        self.assertEqual([feed.take(never).batch_id for _ in range(3)], [0, 1, 2])
        self.assertIsNone(feed.take(never))
        feed.hand_back([first])
        self.assertEqual(feed.take(never).batch_id, 0, "a batch handed back after the end still goes out")
        self.assertIsNone(feed.take(never))

    def test_a_stopped_taker_does_not_wait_for_the_source(self):
        self.assertIsNone(BatchFeed(queue.Queue()).take(lambda: True))

    def test_a_closed_feed_gives_nothing_more_and_keeps_what_it_had_as_pending(self):
        source = queue.Queue()
        for n in range(2):
            source.put(Batch(n, None, None))
        feed = BatchFeed(source)
        never = lambda: False  # noqa: E731
        taken = feed.take(never)
        feed.hand_back([taken])
        feed.close()
        self.assertIsNone(feed.take(never), "a draining job sends nothing new")
        self.assertEqual([batch.batch_id for batch in feed.pending()], [0])


class ArgumentsTest(unittest.TestCase):
    def test_a_query_names_exactly_one_thing_and_urls_are_checked(self):
        client = Client("http://127.0.0.1:9")  # the channel connects lazily: no call is made
        with self.assertRaises(ValueError):
            client.query("index")
        with self.assertRaises(ValueError):
            client.query("index", b"image", id="x")
        with self.assertRaises(ValueError):
            client.query("index", [0.0, float("nan")])
        with self.assertRaises(ValueError):
            client.query("index", "x", plan="fast")
        with self.assertRaises(ValueError):
            Client("ftp://host:1")
        with self.assertRaises(ValueError):
            Client("http://host:1", ca_cert=b"pem")
        client.close()

    def test_several_servers_are_taken_comma_separated_or_as_a_list(self):
        with Client(" http://127.0.0.1:9,127.0.0.1:10 ,") as client:
            self.assertEqual(client.servers, ["http://127.0.0.1:9", "127.0.0.1:10"])
            self.assertEqual(len(client._channels), 2)
        with Client(["http://127.0.0.1:9", "http://127.0.0.1:10,http://127.0.0.1:11"]) as client:
            self.assertEqual(len(client.servers), 3)
        with Client("https://127.0.0.1:9,https://127.0.0.1:10", server_name="imagelsh.test") as client:
            self.assertEqual(len(client._channels), 2)  # one TLS channel each, made lazily
        with self.assertRaises(ValueError):
            Client("http://127.0.0.1:9,http://127.0.0.1:10", ca_cert=b"pem")
        for bad in ("", " , ", [], "http://127.0.0.1:9,ftp://host:1"):
            with self.assertRaises(ValueError, msg=repr(bad)):
                Client(bad)


class RotatingOpenerTest(unittest.TestCase):
    def test_a_stream_starts_on_its_own_server_and_each_retry_moves_to_the_next(self):
        opened = []

        class Stub:
            def __init__(self, name):
                self.name = name

            def Ingest(self, requests, metadata):
                opened.append((self.name, requests, metadata))

        stubs = [Stub("a"), Stub("b"), Stub("c")]
        open_call = rotating_opener(stubs, "Ingest", (("k", "v"),), first=4)
        for attempt in range(4):
            open_call(attempt)
        self.assertEqual([name for name, _, _ in opened], ["b", "c", "a", "b"])
        self.assertEqual(opened[0][1:], (0, (("k", "v"),)))


if __name__ == "__main__":
    unittest.main()
