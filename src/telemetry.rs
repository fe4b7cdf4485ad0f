//! The service's metrics: every name in one place, their help texts, and the Prometheus
//! recorder with real histogram buckets (the exporter renders summaries where no buckets are
//! set). Each layer records through the `metrics` facade, a no-op until `install` runs (as in
//! unit tests); `/metrics` on the HTTP port renders them.

use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const ITEMS_INGESTED: &str = "imagelsh_items_ingested_total";
pub const ITEMS_REFUSED: &str = "imagelsh_items_refused_total";
pub const INGEST_BATCHES: &str = "imagelsh_ingest_batches_total";
pub const INGEST_BATCH_ITEMS: &str = "imagelsh_ingest_batch_items";
pub const BATCHER_QUEUE_DEPTH: &str = "imagelsh_batcher_queue_depth";
pub const BATCHER_WAIT: &str = "imagelsh_batcher_wait_seconds";
pub const INFERENCE: &str = "imagelsh_inference_seconds";
pub const INFERENCE_BATCH_IMAGES: &str = "imagelsh_inference_batch_images";
pub const INFERENCE_PADDED_ROWS: &str = "imagelsh_inference_padded_rows_total";
pub const MODEL_BUSY: &str = "imagelsh_model_busy_seconds_total";
pub const QUERY: &str = "imagelsh_query_seconds";
pub const QUERY_CANDIDATES: &str = "imagelsh_query_candidates";
pub const OPEN_STREAMS: &str = "imagelsh_open_streams";
pub const CALLS: &str = "imagelsh_calls_total";
pub const CALL: &str = "imagelsh_call_seconds";
pub const INDEX_ITEMS: &str = "imagelsh_index_items";
pub const LOG_LAG_ITEMS: &str = "imagelsh_log_lag_items";
pub const APPLY: &str = "imagelsh_apply_seconds";
pub const APPLY_ITEMS: &str = "imagelsh_apply_items";
pub const CHECKPOINT: &str = "imagelsh_checkpoint_seconds";
pub const COMPACTION: &str = "imagelsh_compaction_seconds";
pub const CLUSTER_ACKS: &str = "imagelsh_cluster_acks_total";
pub const CLUSTER_ACK_REPLICAS: &str = "imagelsh_cluster_ack_replicas";
pub const CLUSTER_ACK: &str = "imagelsh_cluster_ack_seconds";

/// Seconds, from 100 µs to 60 s: queries take ~1 ms, model batches tens of milliseconds,
/// checkpoints and compactions seconds.
const SECONDS: [f64; 18] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Counts (items per batch, candidates per query), powers of 4 up to ~1M.
const COUNTS: [f64; 11] = [1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0];

/// Installs the process-wide recorder; its handle renders the text `/metrics` serves.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS)?
        .set_buckets_for_metric(Matcher::Full(INGEST_BATCH_ITEMS.into()), &COUNTS)?
        .set_buckets_for_metric(Matcher::Full(INFERENCE_BATCH_IMAGES.into()), &COUNTS)?
        .set_buckets_for_metric(Matcher::Full(QUERY_CANDIDATES.into()), &COUNTS)?
        .set_buckets_for_metric(Matcher::Full(APPLY_ITEMS.into()), &COUNTS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_counter!(ITEMS_INGESTED, "Items acknowledged as indexed, by index.");
    describe_counter!(ITEMS_REFUSED, "Items refused alone in an ingest batch, by reason.");
    describe_counter!(INGEST_BATCHES, "Ingest batches acknowledged.");
    describe_histogram!(INGEST_BATCH_ITEMS, "Items per ingest batch.");
    describe_gauge!(BATCHER_QUEUE_DEPTH, "Images waiting in the model's queue.");
    describe_histogram!(
        BATCHER_WAIT,
        Unit::Seconds,
        "Time an image waited in the queue before its batch went to the model."
    );
    describe_histogram!(INFERENCE, Unit::Seconds, "Model time per batch (input copy, run, output copy), per instance.");
    describe_histogram!(INFERENCE_BATCH_IMAGES, "Images per model batch.");
    describe_counter!(INFERENCE_PADDED_ROWS, "Rows run as padding (a batch is padded to a fixed size).");
    describe_gauge!(
        MODEL_BUSY,
        Unit::Seconds,
        "Time at least one batch was on the model since start (its instances overlap; this counts the device once)."
    );
    describe_histogram!(QUERY, Unit::Seconds, "Query time in the index (after embedding an image), by plan.");
    describe_histogram!(QUERY_CANDIDATES, "Candidates per query.");
    describe_gauge!(OPEN_STREAMS, "Ingest and embed streams open, by kind.");
    describe_counter!(CALLS, "Calls by method and gRPC status code.");
    describe_histogram!(CALL, Unit::Seconds, "Time to the response's headers (unary: the whole call), by method.");
    describe_gauge!(INDEX_ITEMS, "Items in each index.");
    describe_gauge!(
        LOG_LAG_ITEMS,
        "Items acknowledged (in the write-ahead log) but not yet applied to the store, by index."
    );
    describe_histogram!(APPLY, Unit::Seconds, "Time to apply one group of logged batches to the store.");
    describe_histogram!(APPLY_ITEMS, "Operations (items written and removed) per applied group.");
    describe_histogram!(CHECKPOINT, Unit::Seconds, "Store checkpoints (reads and writes pause meanwhile).");
    describe_histogram!(COMPACTION, Unit::Seconds, "Store rewrites after many removals.");
    describe_counter!(
        CLUSTER_ACKS,
        "Writes acknowledged by the cluster store, by the level obtained (local, replica, replica-fsync)."
    );
    describe_gauge!(
        CLUSTER_ACK_REPLICAS,
        "Replicas that confirmed the last acknowledged write (the fewest across the primaries asked)."
    );
    describe_histogram!(CLUSTER_ACK, Unit::Seconds, "Cluster store: a batch's writes and acknowledgement.");
}

/// Records `elapsed` in the histogram `name`.
pub fn seconds(name: &'static str, elapsed: Duration) {
    metrics::histogram!(name).record(elapsed.as_secs_f64());
}
