//! Every kind of bad input a client can send, through a real server process: each gets its
//! exact status code (or its per-item refusal, with the good items of the same batch indexed),
//! its message stays short, and the server stays up. Image inputs are in `tests/images.rs`
//! and the decoder's unit tests; this suite needs no model.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{TestServer, batch, clustered, create, ingest, query_id, query_vector, vector_item};
use imagelsh::proto::image_index_client::ImageIndexClient;
use imagelsh::proto::{self, Embedding, Item, item::Content};
use tonic::Code;
use tonic::transport::Channel;

const DIM: usize = 8;

async fn alive(client: &mut ImageIndexClient<Channel>) {
    client.list_indexes(proto::ListIndexesRequest {}).await.expect("the server is still up");
}

fn assert_refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, what: &str) -> String {
    let status = result.expect_err(what);
    assert_eq!(status.code(), code, "{what}: {}", status.message());
    assert!(status.message().len() <= 1100, "{what}: a message of {} bytes", status.message().len());
    status.message().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_requests_get_their_codes_and_the_server_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), &["--no-model", "--stream-idle-secs", "1"]);
    let mut client = server.client().await;
    create(&mut client, "h", DIM as u32, 4, 4).await;

    // Index shapes that would size an allocation: refused before it.
    for dim in [2_000_000_000u32, 50_000_000, 100_000] {
        let request = proto::CreateIndexRequest { name: format!("big{dim}"), dim, ..Default::default() };
        let message = assert_refused(client.create_index(request).await, Code::InvalidArgument, "a huge dim");
        assert!(message.contains("--max-dim"), "{message}");
        alive(&mut client).await;
    }
    let request = proto::CreateIndexRequest {
        name: "planes".into(),
        dim: 16_000,
        hash_bits: 64,
        tables: 256,
        ..Default::default()
    };
    let message = assert_refused(client.create_index(request).await, Code::ResourceExhausted, "planes over memory");
    assert!(message.contains("--max-plane-mb"), "{message}");
    for (k, l, bits) in [(65, 4, 0), (0, 257, 0), (4, 4, 100), (4, 4, 8192)] {
        let request = proto::CreateIndexRequest {
            name: "shape".into(),
            dim: 8,
            hash_bits: k,
            tables: l,
            sketch_bits: bits,
            ..Default::default()
        };
        assert_refused(client.create_index(request).await, Code::InvalidArgument, "invalid K, L or sketch bits");
    }
    // Past a fixed maximum a shape is invalid, even where its planes would also be over the memory
    // limit (checked first: the maximum is the reason).
    let request = proto::CreateIndexRequest { name: "tables".into(), dim: 1280, tables: 100_000, ..Default::default() };
    let message = assert_refused(client.create_index(request).await, Code::InvalidArgument, "100,000 tables");
    assert!(message.contains("tables must be in 1..=256"), "{message}");
    // A long name: refused, and the message quotes only its start.
    let request = proto::CreateIndexRequest { name: "n".repeat(100_000), dim: 8, ..Default::default() };
    let message = assert_refused(client.create_index(request).await, Code::InvalidArgument, "a long name");
    assert!(message.len() < 300, "{message}");
    let get = client.get_index(proto::GetIndexRequest { name: "g".repeat(100_000) }).await;
    assert_refused(get, Code::NotFound, "an unknown long name");
    assert_refused(client.query(query_id("nope", "a", 3)).await, Code::NotFound, "an unknown index");

    // Items: each bad one refused alone, the good ones beside it indexed.
    let good = clustered(3, DIM, 1, 0.1, 5);
    let with = |id: &str, values: Vec<f32>| vector_item(id, "l", &values);
    let mut items = vec![
        with("good-0", good[0].clone()),
        with("wrong-dim", vec![1.0; DIM + 1]),
        with("nan", {
            let mut v = good[1].clone();
            v[2] = f32::NAN;
            v
        }),
        with("inf", {
            let mut v = good[1].clone();
            v[0] = f32::INFINITY;
            v
        }),
        with("empty", vec![]),
        with("zeros", vec![0.0; DIM]),
        with("huge", vec![3e38; DIM]),
        with("", good[1].clone()),
        with(&"i".repeat(5000), good[1].clone()),
        with("good-1", good[1].clone()),
    ];
    let mut label = vector_item("big-label", "", &good[2]);
    label.label = "L".repeat(8 << 20);
    items.push(label);
    let mut metadata = vector_item("big-metadata", "", &good[2]);
    metadata.metadata = HashMap::from([("k".to_string(), "m".repeat(20 << 20))]);
    items.push(metadata);
    let mut many = vector_item("many-keys", "", &good[2]);
    many.metadata = (0..1000).map(|i| (format!("k{i}"), String::new())).collect();
    items.push(many);
    items.push(Item { id: "no-content".into(), label: String::new(), metadata: Default::default(), content: None });
    items.push(with("good-2", good[2].clone()));
    let acks = ingest(&mut client, vec![batch("h", 1, items)]).await.expect("the batch is answered");
    let ack = &acks[0];
    assert_eq!(ack.indexed, 3, "{:?}", ack.errors);
    let refused: Vec<u32> = ack.errors.iter().map(|e| e.position).collect();
    assert_eq!(refused, [1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13], "{:?}", ack.errors);
    for error in &ack.errors {
        assert!(error.message.len() < 300 && error.id.len() <= 200, "{error:?}");
    }
    let message_of = |position: u32| &ack.errors.iter().find(|e| e.position == position).unwrap().message;
    assert!(message_of(6).contains("overflows"), "{}", message_of(6));
    assert!(message_of(10).contains("--max-label-bytes"), "{}", message_of(10));
    assert!(message_of(11).contains("--max-metadata-bytes"), "{}", message_of(11));
    assert!(message_of(12).contains("--max-metadata-entries"), "{}", message_of(12));
    for id in ["good-0", "good-1", "good-2"] {
        let hits = client.query(query_id("h", id, 3)).await.expect("a good item is queryable").into_inner().hits;
        assert!(hits.iter().all(|h| h.similarity.is_finite()));
    }

    // Too many items in one batch: the whole batch is refused with RESOURCE_EXHAUSTED.
    let flood: Vec<Item> = (0..5000).map(|i| vector_item(format!("f{i}"), "", &good[0])).collect();
    assert_refused(ingest(&mut client, vec![batch("h", 2, flood)]).await, Code::ResourceExhausted, "5000 items");
    // 200k empty items (400 KB on the wire, ~26 MB once decoded): refused before decoding.
    let empty = vec![Item::default(); 200_000];
    let message = assert_refused(
        ingest(&mut client, vec![batch("h", 2, empty)]).await,
        Code::ResourceExhausted,
        "200k empty items",
    );
    assert!(message.contains("more than the server ever takes"), "{message}");

    // Queries: bad vectors and bounds.
    let mut q = query_vector("h", &[3e38; DIM], 3);
    assert_refused(client.query(q.clone()).await, Code::InvalidArgument, "a query whose norm overflows");
    q.query = Some(proto::query_request::Query::Embedding(Embedding { values: vec![0.0; DIM] }));
    assert_refused(client.query(q.clone()).await, Code::InvalidArgument, "an all-zero query");
    q.query = Some(proto::query_request::Query::Embedding(Embedding { values: vec![f32::NAN; DIM] }));
    assert_refused(client.query(q).await, Code::InvalidArgument, "a NaN query");
    assert_refused(
        client.query(query_vector("h", &[1.0; DIM + 3], 3)).await,
        Code::InvalidArgument,
        "a wrong dimension",
    );
    for (top_k, probes, depth, limit) in [
        (1_000_000, None, 0, "--max-top-k"),
        (3, Some(1_000_000), 0, "--max-probes"),
        (3, None, 1_000_000, "--max-rerank-depth"),
    ] {
        let mut q = query_vector("h", &good[0], top_k);
        q.probes = probes;
        q.rerank_depth = depth;
        let message = assert_refused(client.query(q).await, Code::InvalidArgument, limit);
        assert!(message.contains(limit), "{message}");
    }
    let long_id = client.query(query_id("h", &"x".repeat(100_000), 3)).await;
    assert_refused(long_id, Code::InvalidArgument, "a query by an over-long id");
    let delete = proto::DeleteRequest { index: "h".into(), ids: vec!["y".repeat(100_000)] };
    assert_refused(client.delete(delete).await, Code::InvalidArgument, "a delete of an over-long id");
    alive(&mut client).await;

    // A stream with no deadline of its own that goes quiet is ended after --stream-idle-secs.
    let (tx, rx) = tokio::sync::mpsc::channel::<proto::IngestRequest>(1);
    let started = std::time::Instant::now();
    let quiet = async {
        let mut inbound = client.ingest(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        while inbound.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    }
    .await;
    let message = assert_refused(quiet, Code::DeadlineExceeded, "a stream idle past --stream-idle-secs");
    assert!(message.contains("--stream-idle-secs") && started.elapsed() < Duration::from_secs(10), "{message}");
    drop(tx);

    // Message over the size limit.
    let huge = vec![Item {
        id: "img".into(),
        label: String::new(),
        metadata: Default::default(),
        content: Some(Content::Image(vec![0u8; 70 << 20])),
    }];
    assert_refused(ingest(&mut client, vec![batch("h", 3, huge)]).await, Code::ResourceExhausted, "a 70 MB message");
    alive(&mut client).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_over_the_limit_are_refused_and_abandoned_streams_free_their_place() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), &["--no-model", "--max-streams", "8"]);
    let mut client = server.client().await;
    create(&mut client, "s", DIM as u32, 4, 4).await;
    let v = clustered(1, DIM, 1, 0.1, 1).remove(0);

    // 1,000 streams at once, none of them read: at most 8 are taken, the rest refused.
    let mut opened = Vec::new();
    let mut refused = 0;
    let attempts = (0..1000).map(|i| {
        let mut client = client.clone();
        let item = vector_item(format!("open{i}"), "", &v);
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(batch("s", i, vec![item])).await.unwrap();
            let result = client.ingest(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
            (tx, result)
        }
    });
    for (tx, result) in futures::future::join_all(attempts).await {
        match result {
            Ok(response) => opened.push((tx, response)),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{}", status.message());
                refused += 1;
            }
        }
    }
    assert!(opened.len() <= 8 && refused >= 992, "{} open, {refused} refused", opened.len());
    alive(&mut client).await;
    // Clients that disconnect mid-stream: their places come back.
    drop(opened);
    let mut freed = false;
    for _ in 0..50 {
        if ingest(&mut client, vec![batch("s", 5000, vec![vector_item("after", "", &v)])]).await.is_ok() {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "a stream is taken once the abandoned ones are gone");

    // A stream idle past its grpc-timeout ends with DEADLINE_EXCEEDED (not tonic's CANCELLED;
    // unary deadlines are unit-tested on the layer, `api::guard`, with a call that cannot
    // finish in time).
    let (tx, rx) = tokio::sync::mpsc::channel::<proto::IngestRequest>(1);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert("grpc-timeout", "300m".parse().unwrap());
    let started = std::time::Instant::now();
    let outcome = async {
        let mut inbound = client.ingest(request).await?.into_inner();
        while inbound.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    }
    .await;
    assert_refused(outcome, Code::DeadlineExceeded, "an idle stream past its deadline");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    drop(tx);
    alive(&mut client).await;

    // DropIndex while streams ingest into it: the streams end with NOT_FOUND or finish.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let mut client = client.clone();
            let v = v.clone();
            tokio::spawn(async move {
                let batches = (0..200).map(|b| batch("s", b, vec![vector_item(format!("w{w}-{b}"), "", &v)])).collect();
                ingest(&mut client, batches).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.drop_index(proto::DropIndexRequest { name: "s".into() }).await.expect("drop while ingesting");
    for writer in writers {
        if let Err(status) = writer.await.unwrap() {
            assert_eq!(status.code(), Code::NotFound, "{}", status.message());
        }
    }
    alive(&mut client).await;
}
