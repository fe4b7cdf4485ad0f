//! The gRPC codec of `imagelsh.v1`: prost's, with two changes on the way in.
//!
//! - Before decoding, each request's wire bytes are walked to count the entries of its
//!   repeated fields. Decoding expands entries: an empty `Item` is 2 bytes on the wire and
//!   ~130 in memory, so a 64 MiB message of them would take ~4 GiB. The walk refuses a message
//!   with more entries than the server ever takes, before prost allocates for them. (The
//!   configurable, smaller limits, `--max-batch-items` and the rest, are checked after
//!   decoding, by the use cases.)
//! - Bytes that are not a valid message are INVALID_ARGUMENT (the client's fault), not
//!   prost's INTERNAL.

use std::marker::PhantomData;

use prost::Message;
use prost::bytes::Buf;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::proto;

/// Entries of one repeated field (items, images, ids) that any message may hold.
pub const MAX_WIRE_ENTRIES: usize = 65_536;
/// Metadata entries over all items of one ingest batch.
pub const MAX_WIRE_METADATA_ENTRIES: usize = 262_144;

/// What a message's wire bytes may hold before it is decoded.
pub trait WireBounds {
    /// Refuses `wire` if decoding it would expand past the bounds; malformed bytes pass
    /// (decoding reports them).
    fn check_wire(_wire: &[u8]) -> Result<(), Status> {
        Ok(())
    }
}

/// Calls `f(field number, value)` for each top-level field of a message: `value` is the
/// payload of a length-delimited field, empty for the other wire types. `None`: malformed.
fn walk(mut wire: &[u8], mut f: impl FnMut(u32, &[u8]) -> Result<(), Status>) -> Option<Result<(), Status>> {
    while !wire.is_empty() {
        let key = prost::encoding::decode_varint(&mut wire).ok()?;
        let field = u32::try_from(key >> 3).ok()?;
        let value: &[u8] = match key & 7 {
            0 => {
                prost::encoding::decode_varint(&mut wire).ok()?;
                &[]
            }
            1 => {
                wire = wire.get(8..)?;
                &[]
            }
            2 => {
                let len = usize::try_from(prost::encoding::decode_varint(&mut wire).ok()?).ok()?;
                let value = wire.get(..len)?;
                wire = &wire[len..];
                value
            }
            5 => {
                wire = wire.get(4..)?;
                &[]
            }
            _ => return None,
        };
        if let Err(status) = f(field, value) {
            return Some(Err(status));
        }
    }
    Some(Ok(()))
}

fn too_many(what: &str, limit: usize) -> Status {
    Status::resource_exhausted(format!("the message holds more than {limit} {what}, more than the server ever takes"))
}

/// Counts the entries of field `repeated`: at most `MAX_WIRE_ENTRIES`.
fn check_repeated(wire: &[u8], repeated: u32, what: &str) -> Result<(), Status> {
    let mut count = 0usize;
    let walked = walk(wire, |field, _| {
        if field == repeated {
            count += 1;
            if count > MAX_WIRE_ENTRIES {
                return Err(too_many(what, MAX_WIRE_ENTRIES));
            }
        }
        Ok(())
    });
    walked.unwrap_or(Ok(()))
}

impl WireBounds for proto::IngestRequest {
    fn check_wire(wire: &[u8]) -> Result<(), Status> {
        const ITEMS: u32 = 3;
        const METADATA: u32 = 3;
        let (mut items, mut metadata) = (0usize, 0usize);
        let walked = walk(wire, |field, item| {
            if field != ITEMS {
                return Ok(());
            }
            items += 1;
            if items > MAX_WIRE_ENTRIES {
                return Err(too_many("items", MAX_WIRE_ENTRIES));
            }
            let inner = walk(item, |field, _| {
                if field == METADATA {
                    metadata += 1;
                    if metadata > MAX_WIRE_METADATA_ENTRIES {
                        return Err(too_many("metadata entries", MAX_WIRE_METADATA_ENTRIES));
                    }
                }
                Ok(())
            });
            inner.unwrap_or(Ok(()))
        });
        walked.unwrap_or(Ok(()))
    }
}

impl WireBounds for proto::EmbedRequest {
    fn check_wire(wire: &[u8]) -> Result<(), Status> {
        check_repeated(wire, 2, "images")
    }
}

impl WireBounds for proto::DeleteRequest {
    fn check_wire(wire: &[u8]) -> Result<(), Status> {
        check_repeated(wire, 2, "ids")
    }
}

impl WireBounds for proto::GetItemsRequest {
    fn check_wire(wire: &[u8]) -> Result<(), Status> {
        check_repeated(wire, 2, "ids")
    }
}

// Messages without repeated fields that expand (floats are packed: 4 bytes on the wire, 4
// in memory), and the responses (the server bounds what it sends).
impl WireBounds for proto::CreateIndexRequest {}
impl WireBounds for proto::GetIndexRequest {}
impl WireBounds for proto::ListIndexesRequest {}
impl WireBounds for proto::DropIndexRequest {}
impl WireBounds for proto::QueryRequest {}
impl WireBounds for proto::IndexInfo {}
impl WireBounds for proto::ListIndexesResponse {}
impl WireBounds for proto::DropIndexResponse {}
impl WireBounds for proto::IngestResponse {}
impl WireBounds for proto::QueryResponse {}
impl WireBounds for proto::DeleteResponse {}
impl WireBounds for proto::EmbedResponse {}
impl WireBounds for proto::GetItemsResponse {}
impl WireBounds for proto::BackupRequest {}
impl WireBounds for proto::BackupChunk {}

/// The codec the generated service and client use (`build.rs`, `codec_path`).
pub struct BoundedCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + WireBounds + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder { inner: self.0.decoder(), _message: PhantomData }
    }
}

pub struct BoundedDecoder<U> {
    inner: ProstDecoder<U>,
    _message: PhantomData<U>,
}

impl<U: Message + Default + WireBounds> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // One message, contiguous: tonic hands the decoder exactly its bytes.
        U::check_wire(src.chunk())?;
        self.inner
            .decode(src)
            .map_err(|status| Status::invalid_argument(format!("the message cannot be decoded: {}", status.message())))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(message: &impl Message) -> Vec<u8> {
        message.encode_to_vec()
    }

    #[test]
    fn many_empty_entries_are_refused_before_decoding_and_real_batches_pass() {
        let empty_items =
            proto::IngestRequest { items: vec![proto::Item::default(); MAX_WIRE_ENTRIES + 1], ..Default::default() };
        let refused = proto::IngestRequest::check_wire(&encode(&empty_items)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let item = proto::Item {
            id: "a".into(),
            metadata: (0..10).map(|i| (format!("k{i}"), "v".into())).collect(),
            ..Default::default()
        };
        let batch = proto::IngestRequest { index: "i".into(), batch_id: 3, items: vec![item.clone(); 256] };
        proto::IngestRequest::check_wire(&encode(&batch)).unwrap();
        let metadata_heavy = proto::IngestRequest {
            items: vec![
                proto::Item { metadata: (0..20_000).map(|i| (i.to_string(), String::new())).collect(), ..item };
                14
            ],
            ..Default::default()
        };
        assert!(proto::IngestRequest::check_wire(&encode(&metadata_heavy)).is_err());
        let ids = proto::DeleteRequest { index: "i".into(), ids: vec![String::new(); MAX_WIRE_ENTRIES + 1] };
        let lookup = proto::GetItemsRequest { ids: vec![String::new(); MAX_WIRE_ENTRIES + 1], ..Default::default() };
        assert!(proto::GetItemsRequest::check_wire(&encode(&lookup)).is_err());
        assert!(proto::DeleteRequest::check_wire(&encode(&ids)).is_err());
        let images = proto::EmbedRequest { batch_id: 1, images: vec![Vec::new(); MAX_WIRE_ENTRIES + 1] };
        assert!(proto::EmbedRequest::check_wire(&encode(&images)).is_err());
        // Malformed bytes pass the walk: decoding reports them.
        assert!(proto::IngestRequest::check_wire(&[0xff, 0xff, 0xff]).is_ok());
    }
}
