//! Contact sheets: the notebook's figure as a PNG. Each row is a query image and its best
//! matches, each tile captioned with its label, votes and similarity; a match whose label is
//! the query's is framed green, another label red.

use std::path::Path;

use embedded_graphics::geometry::{OriginDimensions, Point, Size};
use embedded_graphics::mono_font::MonoTextStyle;
use embedded_graphics::mono_font::iso_8859_1::{FONT_6X10, FONT_7X13_BOLD};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::{DrawTarget, RgbColor};
use embedded_graphics::text::{Baseline, Text};
use embedded_graphics::{Drawable, Pixel};
use image::imageops::FilterType;
use image::{Rgb, RgbImage};

/// Pixels of a tile's picture (a square; images are scaled to fit, aspect kept).
const PICTURE: u32 = 112;
const GAP: u32 = 8;
const FRAME: u32 = 3;
/// Caption lines under a picture.
const CAPTION_LINES: u32 = 3;
const LINE: u32 = 11;
const TITLE: u32 = 22;
const TILE_W: u32 = PICTURE + 2 * FRAME;
const TILE_H: u32 = PICTURE + 2 * FRAME + CAPTION_LINES * LINE + 4;
/// Characters of a caption line that fit under a picture (6-pixel glyphs).
const CAPTION_CHARS: usize = (TILE_W / 6) as usize;
/// The most tiles a sheet draws: a sheet of 1,000 × 100 tiles would be a gigapixel image.
pub const MAX_ROWS: usize = 64;
pub const MAX_MATCHES: usize = 24;

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const QUERY: Rgb<u8> = Rgb([40, 90, 200]);
const SAME: Rgb<u8> = Rgb([30, 160, 60]);
const OTHER: Rgb<u8> = Rgb([210, 50, 40]);
const UNKNOWN: Rgb<u8> = Rgb([170, 170, 170]);

/// One picture and what is written under it.
#[derive(Debug, Clone, Default)]
pub struct Tile {
    /// `None` draws a grey square ("no image"): a match whose file and thumbnail are absent.
    pub image: Option<RgbImage>,
    pub label: String,
    /// Lines under the label (votes and similarity; the query's id).
    pub lines: Vec<String>,
}

/// A query and its matches, best first.
#[derive(Debug, Clone, Default)]
pub struct SheetRow {
    pub query: Tile,
    pub matches: Vec<Tile>,
}

impl Tile {
    /// The caption of a match: its label, then votes and similarity.
    pub fn of_match(image: Option<RgbImage>, id: &str, label: &str, votes: u32, similarity: f32) -> Self {
        Tile {
            image,
            label: label.to_string(),
            lines: vec![format!("votes {votes}  sim {similarity:.3}"), id.to_string()],
        }
    }
}

/// Renders `rows` (at most `MAX_ROWS`, each with at most `MAX_MATCHES` matches) under `title`.
pub fn render(title: &str, rows: &[SheetRow]) -> RgbImage {
    let rows = &rows[..rows.len().min(MAX_ROWS)];
    let columns = rows.iter().map(|r| r.matches.len().min(MAX_MATCHES)).max().unwrap_or(0) as u32 + 1;
    // The query column stands apart from the matches by a wider gap.
    let width = GAP + columns * (TILE_W + GAP) + 2 * GAP;
    let height = GAP + TITLE + rows.len() as u32 * (TILE_H + GAP) + GAP;
    let mut canvas = Canvas(RgbImage::from_pixel(width, height, BACKGROUND));
    canvas.text(title, GAP as i32, GAP as i32, &FONT_7X13_BOLD, Rgb([0, 0, 0]));
    for (r, row) in rows.iter().enumerate() {
        let y = GAP + TITLE + r as u32 * (TILE_H + GAP);
        canvas.tile(&row.query, GAP, y, QUERY);
        for (c, tile) in row.matches.iter().take(MAX_MATCHES).enumerate() {
            let frame = match (row.query.label.is_empty(), tile.label == row.query.label) {
                (true, _) => UNKNOWN,
                (false, true) => SAME,
                (false, false) => OTHER,
            };
            canvas.tile(tile, 3 * GAP + (c as u32 + 1) * (TILE_W + GAP), y, frame);
        }
    }
    canvas.0
}

/// Renders and writes a sheet as a PNG.
pub fn write_png(path: &Path, title: &str, rows: &[SheetRow]) -> Result<(), image::ImageError> {
    render(title, rows).save_with_format(path, image::ImageFormat::Png)
}

/// `line` cut to what fits under a picture.
fn fit_caption(line: &str) -> String {
    match line.chars().count() > CAPTION_CHARS {
        true => line.chars().take(CAPTION_CHARS - 2).chain("..".chars()).collect(),
        false => line.to_string(),
    }
}

struct Canvas(RgbImage);

impl Canvas {
    fn tile(&mut self, tile: &Tile, x: u32, y: u32, frame: Rgb<u8>) {
        self.fill(x, y, TILE_W, PICTURE + 2 * FRAME, frame);
        self.fill(x + FRAME, y + FRAME, PICTURE, PICTURE, Rgb([235, 235, 235]));
        match &tile.image {
            Some(image) if image.width() > 0 && image.height() > 0 => {
                let picture = scale_to_fit(image, PICTURE);
                let left = x + FRAME + (PICTURE - picture.width()) / 2;
                let top = y + FRAME + (PICTURE - picture.height()) / 2;
                image::imageops::replace(&mut self.0, &picture, i64::from(left), i64::from(top));
            }
            _ => self.text("no image", (x + FRAME + 32) as i32, (y + FRAME + 50) as i32, &FONT_6X10, UNKNOWN),
        }
        let mut line_y = y + PICTURE + 2 * FRAME + 3;
        let label = if tile.label.is_empty() { "(no label)" } else { tile.label.as_str() };
        self.text(&fit_caption(label), x as i32, line_y as i32, &FONT_6X10, Rgb([0, 0, 0]));
        for line in tile.lines.iter().take(CAPTION_LINES as usize - 1) {
            line_y += LINE;
            self.text(&fit_caption(line), x as i32, line_y as i32, &FONT_6X10, Rgb([90, 90, 90]));
        }
    }

    fn fill(&mut self, x: u32, y: u32, w: u32, h: u32, colour: Rgb<u8>) {
        for py in y..(y + h).min(self.0.height()) {
            for px in x..(x + w).min(self.0.width()) {
                self.0.put_pixel(px, py, colour);
            }
        }
    }

    fn text(&mut self, text: &str, x: i32, y: i32, font: &embedded_graphics::mono_font::MonoFont<'_>, colour: Rgb<u8>) {
        let style = MonoTextStyle::new(font, Rgb888::new(colour[0], colour[1], colour[2]));
        // Drawing onto an in-memory image cannot fail (`Error = Infallible`).
        let Ok(_) = Text::with_baseline(text, Point::new(x, y), style, Baseline::Top).draw(self);
    }
}

impl OriginDimensions for Canvas {
    fn size(&self) -> Size {
        Size::new(self.0.width(), self.0.height())
    }
}

impl DrawTarget for Canvas {
    type Color = Rgb888;
    type Error = std::convert::Infallible;

    fn draw_iter<I: IntoIterator<Item = Pixel<Rgb888>>>(&mut self, pixels: I) -> Result<(), Self::Error> {
        for Pixel(point, colour) in pixels {
            if let (Ok(x), Ok(y)) = (u32::try_from(point.x), u32::try_from(point.y))
                && x < self.0.width()
                && y < self.0.height()
            {
                self.0.put_pixel(x, y, Rgb([colour.r(), colour.g(), colour.b()]));
            }
        }
        Ok(())
    }
}

/// `image` scaled so that its longer side is `side`: small images (a 28-pixel Fashion-MNIST
/// item, a thumbnail) are enlarged with hard pixel edges, as the notebook's imshow drew them.
fn scale_to_fit(image: &RgbImage, side: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    let longer = w.max(h);
    let (tw, th) = (
        ((u64::from(w) * u64::from(side) / u64::from(longer)) as u32).max(1),
        ((u64::from(h) * u64::from(side) / u64::from(longer)) as u32).max(1),
    );
    let filter = if longer * 2 <= side { FilterType::Nearest } else { FilterType::Triangle };
    image::imageops::resize(image, tw, th, filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(w: u32, h: u32, c: [u8; 3]) -> Option<RgbImage> {
        Some(RgbImage::from_pixel(w, h, Rgb(c)))
    }

    #[test]
    fn a_sheet_has_a_row_per_query_and_frames_matches_by_label() {
        let query = Tile { image: solid(28, 28, [0, 0, 0]), label: "Sandal".into(), lines: vec!["query".into()] };
        let rows = vec![
            SheetRow {
                query: query.clone(),
                matches: vec![
                    Tile::of_match(solid(96, 64, [250, 0, 0]), "a", "Sandal", 12, 0.93),
                    Tile::of_match(None, "b", "Sneaker", 7, 0.81),
                ],
            },
            SheetRow { query, matches: vec![Tile::of_match(solid(500, 20, [0, 0, 250]), "c", "Sandal", 3, 0.5)] },
        ];
        let sheet = render("test", &rows);
        assert_eq!(sheet.width(), GAP + 3 * (TILE_W + GAP) + 2 * GAP);
        assert_eq!(sheet.height(), GAP + TITLE + 2 * (TILE_H + GAP) + GAP);
        let y = GAP + TITLE + 1;
        let first_match = 3 * GAP + TILE_W + GAP;
        assert_eq!(*sheet.get_pixel(GAP + 1, y), QUERY);
        assert_eq!(*sheet.get_pixel(first_match + 1, y), SAME);
        assert_eq!(*sheet.get_pixel(first_match + TILE_W + GAP + 1, y), OTHER);
        // The first match's picture: red, scaled to the tile's width.
        assert_eq!(*sheet.get_pixel(first_match + FRAME + PICTURE / 2, y + FRAME + PICTURE / 2), Rgb([250, 0, 0]));
        // Captions are drawn: dark pixels under the picture.
        let caption = (first_match..first_match + TILE_W)
            .flat_map(|x| (y + PICTURE + 2 * FRAME..y + TILE_H).map(move |yy| (x, yy)))
            .filter(|&(x, yy)| sheet.get_pixel(x, yy)[0] < 100)
            .count();
        assert!(caption > 50, "{caption} caption pixels");
    }

    #[test]
    fn rows_and_matches_are_bounded() {
        let row = SheetRow { query: Tile::default(), matches: vec![Tile::default(); 1000] };
        let sheet = render("big", &vec![row; 1000]);
        assert_eq!(sheet.width(), GAP + (MAX_MATCHES as u32 + 1) * (TILE_W + GAP) + 2 * GAP);
        assert_eq!(sheet.height(), GAP + TITLE + MAX_ROWS as u32 * (TILE_H + GAP) + GAP);
    }

    #[test]
    fn long_captions_are_cut() {
        assert_eq!(fit_caption(&"x".repeat(100)).chars().count(), CAPTION_CHARS);
        assert_eq!(fit_caption("Sandal"), "Sandal");
    }
}
