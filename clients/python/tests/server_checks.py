"""The client against a real server, as tests/python_client.rs runs it (the server with the
default model, an admin and a read token, and a folder of labelled images with one broken file):
    IMAGELSH_TEST_SERVER=http://127.0.0.1:50051 IMAGELSH_TEST_TOKEN=... IMAGELSH_TEST_READ_TOKEN=... \
    IMAGELSH_TEST_FOLDER=photos IMAGELSH_TEST_IMAGES=48 python clients/python/tests/server_checks.py
"""
import json
import math
import os
import tempfile
import unittest

import imagelsh
from imagelsh import Client

SERVER = os.environ.get("IMAGELSH_TEST_SERVER", "http://127.0.0.1:50051")
TOKEN = os.environ.get("IMAGELSH_TEST_TOKEN")
READ_TOKEN = os.environ.get("IMAGELSH_TEST_READ_TOKEN")
FOLDER = os.environ.get("IMAGELSH_TEST_FOLDER", "")
IMAGES = int(os.environ.get("IMAGELSH_TEST_IMAGES", "0"))
INDEX = "python"


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


class ServerChecks(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.client = Client(SERVER, TOKEN)
        cls.refused_file = tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False).name
        os.unlink(cls.refused_file)
        cls.first = cls.client.ingest_folder(INDEX, FOLDER, batch_size=8, parallel=2, max_in_flight=2,
                                             progress=False, refused_file=cls.refused_file)
        cls.items = imagelsh.plan_folder(FOLDER)
        cls.image = next(item for item in cls.items if not item.id.endswith("broken.jpg"))
        with open(cls.image.path, "rb") as file:
            cls.image_bytes = file.read()

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        if os.path.exists(cls.refused_file):
            os.unlink(cls.refused_file)

    def test_a_folder_is_indexed_once_with_the_broken_file_refused_and_written_down(self):
        first = self.first
        self.assertEqual((first.indexed, first.skipped, first.remaining), (IMAGES, 0, 0), first)
        self.assertEqual([r.id for r in first.refused], ["class0/broken.jpg"], first.refused)
        self.assertTrue(first.refused[0].source.endswith("broken.jpg") and first.refused[0].reason, first.refused)
        self.assertGreater(first.rate, 0)
        with open(self.refused_file) as file:
            written = [json.loads(line) for line in file]
        self.assertEqual([(w["id"], w["source"]) for w in written], [("class0/broken.jpg", first.refused[0].source)])
        info = self.client.get_index(INDEX)
        self.assertEqual((info.items, info.thumbnails, info.dim), (IMAGES, True, 1280), info)

    def test_a_rerun_skips_what_the_index_holds(self):
        again = self.client.ingest_folder(INDEX, FOLDER, progress=False)
        self.assertEqual((again.indexed, again.skipped, len(again.refused), again.remaining), (0, IMAGES, 1, 0), again)
        self.assertEqual(self.client.get_index(INDEX).items, IMAGES)

    def test_a_query_by_image_finds_the_image_itself_first_with_its_label_and_source(self):
        result = self.client.query(INDEX, self.image_bytes, top_k=5)
        self.assertEqual(len(result), 5)
        best = result[0]
        self.assertEqual((best.id, best.label), (self.image.id, self.image.label))
        self.assertGreater(best.similarity, 0.99)
        self.assertEqual(best.metadata["source"], self.image.path)
        self.assertGreaterEqual(best.votes, 1)
        self.assertIn(result.plan, ("TABLES", "SCAN"))
        self.assertGreaterEqual(result.candidates, 5)
        similarities = [hit.similarity for hit in result]
        self.assertEqual(similarities, sorted(similarities, reverse=True))

    def test_a_query_by_id_leaves_the_item_out(self):
        hits = self.client.query(INDEX, id=self.image.id, top_k=4).hits
        self.assertEqual(len(hits), 4)
        self.assertNotIn(self.image.id, [hit.id for hit in hits])
        self.assertEqual(hits, self.client.query(INDEX, self.image.id, top_k=4).hits, "a str is an id")

    def test_embed_gives_the_stored_embedding_and_a_query_by_it_finds_the_item(self):
        [vector] = self.client.embed([self.image_bytes])
        self.assertEqual(len(vector), 1280)
        [stored], missing = self.client.get_items(INDEX, [self.image.id, "no such id"], with_embeddings=True,
                                                  with_thumbnails=True)
        self.assertEqual(missing, ["no such id"])
        self.assertGreater(cosine(vector, stored.embedding), 0.999)
        self.assertEqual(stored.metadata["source"], self.image.path)
        self.assertTrue(stored.thumbnail.startswith(b"\xff\xd8") and len(stored.thumbnail) <= 4096)
        self.assertEqual(self.client.query(INDEX, vector, top_k=1)[0].id, self.image.id)

    def test_embed_keeps_order_over_batches_and_names_refused_images(self):
        images = [self.image_bytes] * 5 + [b"not an image"] + [self.image_bytes]
        with self.assertRaises(imagelsh.ImagesRefused) as refused:
            self.client.embed(images, batch_size=2, max_in_flight=2)
        self.assertEqual([r.id for r in refused.exception.refused], ["5"])
        embeddings = refused.exception.embeddings
        self.assertIsNone(embeddings[5])
        self.assertTrue(all(cosine(embeddings[0], e) > 0.9999 for i, e in enumerate(embeddings) if i != 5))

    def test_errors_come_as_the_clients_types(self):
        with self.assertRaises(imagelsh.NotFound):
            self.client.get_index("no-such-index")
        with self.assertRaises(imagelsh.InvalidArgument):
            self.client.query(INDEX, [0.5] * 3)
        with Client(SERVER, "a-token-the-server-never-issued") as stranger:
            with self.assertRaises(imagelsh.Unauthenticated):
                stranger.list_indexes()
        with Client(SERVER, READ_TOKEN) as reader:
            self.assertEqual(reader.query(INDEX, self.image_bytes, top_k=1)[0].id, self.image.id)
            with self.assertRaises(imagelsh.PermissionDenied):
                reader.create_index("not-allowed")
            with self.assertRaises(imagelsh.PermissionDenied):
                reader.ingest_folder(INDEX + "-reader", FOLDER, progress=False)

    def test_an_index_is_created_deleted_from_and_dropped(self):
        info = self.client.create_index("python-vectors", dim=4, hash_bits=4, tables=2, seed=7)
        self.assertEqual((info.dim, info.hash_bits, info.tables, info.items), (4, 4, 2, 0))
        with self.assertRaises(imagelsh.AlreadyExists):
            self.client.create_index("python-vectors", dim=4)
        self.assertIn("python-vectors", [i.name for i in self.client.list_indexes()])
        self.assertEqual(self.client.delete("python-vectors", ["absent"]), 0)
        self.client.drop_index("python-vectors")
        with self.assertRaises(imagelsh.NotFound):
            self.client.get_index("python-vectors")


if __name__ == "__main__":
    unittest.main(verbosity=2)
