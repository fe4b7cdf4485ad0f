//! Arbitrary bytes as the wire messages a client sends, through the real use cases over an
//! in-memory store: CreateIndex, Ingest and Query requests are decoded as the server's
//! transport would, and every one is answered (indexed, refused per item, or an error),
//! never a panic, an abort or an allocation the limits do not allow.
#![no_main]

use std::sync::{Arc, LazyLock};

use imagelsh::api::query_call;
use imagelsh::index::Engine;
use imagelsh::limits::RequestLimits;
use imagelsh::proto;
use imagelsh::store::MemoryCatalog;
use imagelsh::usecase::{IncomingItem, NewIndex, UseCases};
use libfuzzer_sys::fuzz_target;
use prost::Message;

struct World {
    runtime: tokio::runtime::Runtime,
    cases: UseCases,
    _log: tempfile::TempDir,
}

static WORLD: LazyLock<World> = LazyLock::new(|| {
    let log = tempfile::tempdir().expect("temp dir");
    let engine = Engine::open(Arc::new(MemoryCatalog::new()), log.path(), 16).expect("engine");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let cases = UseCases::new(Arc::new(engine), None, RequestLimits { max_dim: 256, max_plane_bytes: 8 << 20, ..Default::default() });
    let world = World { runtime, cases, _log: log };
    let create = NewIndex { name: "f".into(), dim: 16, hash_bits: 4, tables: 4, sketch_bits: 64, ..Default::default() };
    world.runtime.block_on(world.cases.create(create)).expect("the fuzzed index");
    world
});

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else { return };
    let world = &*WORLD;
    world.runtime.block_on(async {
        match kind % 3 {
            0 => {
                let Ok(r) = proto::CreateIndexRequest::decode(bytes) else { return };
                if let Ok(info) = world.cases.create(NewIndex::from(r)).await
                    && info.def.name != "f"
                {
                    let _ = world.cases.engine().drop_index(&info.def.name);
                }
            }
            1 => {
                let Ok(r) = proto::IngestRequest::decode(bytes) else { return };
                let items = r.items.into_iter().map(IncomingItem::from).collect();
                let _ = world.cases.ingest("f", items).await;
            }
            _ => {
                let Ok(r) = proto::QueryRequest::decode(bytes) else { return };
                let Ok((_, input, options)) = query_call(r) else { return };
                if let Ok(result) = world.cases.query("f".into(), input, options).await {
                    assert!(result.hits.iter().all(|h| h.similarity.is_finite() && h.score.is_finite()));
                }
            }
        }
    });
});
