//! The pictures of a query's hits for a contact sheet: each item's thumbnail from the server,
//! else the file its `source` metadata names when that file is readable here.

use std::collections::HashMap;

use image::RgbImage;

use super::sheet::Tile;
use super::source::SOURCE_KEY;
use super::{Client, ClientError};
use crate::proto;

/// Larger files are not read for a sheet (a picture is drawn 112 pixels wide).
const MAX_PICTURE_FILE_BYTES: u64 = 32 << 20;

/// One tile per hit, best first, captioned with label, votes and similarity.
pub async fn match_tiles(client: &mut Client, index: &str, hits: &[proto::Hit]) -> Result<Vec<Tile>, ClientError> {
    let request = proto::GetItemsRequest {
        index: index.to_string(),
        ids: hits.iter().map(|h| h.id.clone()).collect(),
        with_thumbnails: true,
        ..Default::default()
    };
    let items = client
        .get_items(request)
        .await
        .map_err(|status| ClientError::Rpc { context: "reading the hits' thumbnails".into(), status })?
        .into_inner()
        .items;
    let mut thumbnails: HashMap<String, Vec<u8>> = items.into_iter().map(|i| (i.id, i.thumbnail)).collect();
    Ok(hits
        .iter()
        .map(|hit| {
            let thumbnail = thumbnails.remove(&hit.id).filter(|t| !t.is_empty());
            let image = thumbnail
                .and_then(|jpeg| decode_picture(&jpeg))
                .or_else(|| hit.metadata.get(SOURCE_KEY).and_then(|path| picture_file(path)));
            Tile::of_match(image, &hit.id, &hit.label, hit.votes, hit.similarity)
        })
        .collect())
}

/// An image file as RGB, if it is there, small enough and decodes.
pub fn picture_file(path: &str) -> Option<RgbImage> {
    let size = std::fs::metadata(path).ok()?.len();
    if size > MAX_PICTURE_FILE_BYTES {
        return None;
    }
    decode_picture(&std::fs::read(path).ok()?)
}

/// Encoded image bytes as RGB, if they decode.
pub fn decode_picture(bytes: &[u8]) -> Option<RgbImage> {
    image::load_from_memory(bytes).ok().map(|i| i.into_rgb8())
}
