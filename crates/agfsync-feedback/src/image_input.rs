//! Reading images to score, converted to 8-bit RGB the way transformers'
//! image processors see them.
//!
//! Reference: transformers 5 `image_transforms.convert_to_rgb` applied to a
//! `PIL.Image.open(path)` image (what `CLIPImageProcessor`, open_clip and the
//! LAION aesthetic code are given). Pillow's rules, reproduced here and
//! checked against Pillow 13 by the parity fixtures:
//!
//! * anything with an alpha channel (RGBA, LA, a PNG `tRNS` chunk, a palette
//!   with a transparent entry) is composited onto opaque white; Pillow's
//!   integer `alpha_composite` equals `round((c * a + 255 * (255 - a)) / 255)`
//!   for every 8-bit `c` and `a`;
//! * grey is replicated into R, G and B;
//! * 16-bit RGB(A) and grey+alpha PNGs keep the high byte (`v >> 8`, not a
//!   rounded `v / 257`);
//! * 16-bit grey PNGs open as Pillow's `I;16`, whose RGB conversion *clips*
//!   at 255: every value above 255 becomes white. This is what transformers
//!   computes, so it is the default; [`Grey16::Scale`] keeps the high byte
//!   instead (sensible, but not what the references do);
//! * CMYK JPEGs (Adobe, inverted) become `round((255 - c)(255 - k) / 255)`
//!   per channel (Pillow's `MULDIV255` arithmetic);
//! * EXIF orientation is ignored (`Image.open` does not apply it);
//!   [`DecodeOptions::apply_exif_orientation`] applies it.
//!
//! JPEGs are decoded by [`crate::jpeg`], which reproduces libjpeg-turbo
//! (Pillow's decoder) exactly; PNG and WebP by the `image` crate (PNG and
//! lossless WebP are exact; lossy WebP may differ from libwebp by a level
//! here and there).

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use crate::error::{read_bytes, FeedbackError, Result};
use crate::jpeg::{self, JpegPixels};

/// How 16-bit greyscale PNGs are turned into 8 bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Grey16 {
    /// As Pillow (and so transformers) does: values above 255 clip to 255.
    /// Most 16-bit grey images come out nearly white, but the scores equal
    /// the reference implementations'.
    #[default]
    ClipLikePillow,
    /// Keep the high byte (`v >> 8`), as for 16-bit colour images.
    Scale,
}

/// How a refused image's error says to raise the pixel limit.
pub const RAISE_PIXELS: &str = "raise the limit with `[limits] max_image_pixels` in agfsync.toml \
     or `--max-pixels` on the command line if the image is trusted";

/// The default of [`DecodeOptions::max_pixels`]: Pillow's own refusal
/// threshold (twice its 89 Mpx warning).
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;

/// Options for [`load_image`] and [`decode_image`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Conversion of 16-bit greyscale PNGs.
    pub grey16: Grey16,
    /// Rotate/flip by the EXIF orientation tag (transformers does not).
    pub apply_exif_orientation: bool,
    /// Refuse images with more pixels than this (decompression bombs).
    pub max_pixels: u64,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            grey16: Grey16::default(),
            apply_exif_orientation: false,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

/// An image decoded to 8-bit RGB, ready for any scorer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedImage {
    /// Where the image came from (reported with its scores and errors).
    pub path: PathBuf,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Row-major `height x width x 3` RGB bytes.
    pub rgb: Vec<u8>,
    /// The file's format and colour layout before conversion, for example
    /// `PNG Rgba16` (informative).
    pub source_layout: String,
}

impl LoadedImage {
    /// Wraps RGB bytes (`height x width x 3`, row-major).
    pub fn from_rgb(
        path: impl Into<PathBuf>,
        width: u32,
        height: u32,
        rgb: Vec<u8>,
    ) -> Result<Self> {
        let path = path.into();
        let want = width as usize * height as usize * 3;
        if rgb.len() != want || width == 0 || height == 0 {
            return Err(FeedbackError::Image {
                path,
                reason: format!(
                    "{width}x{height} RGB needs {want} bytes (and a non-empty size), got {}",
                    rgb.len()
                ),
            });
        }
        Ok(Self {
            path,
            width,
            height,
            rgb,
            source_layout: "RGB".into(),
        })
    }
}

/// Reads and decodes the image file at `path` (PNG, JPEG or WebP).
pub fn load_image(path: impl AsRef<Path>, options: &DecodeOptions) -> Result<LoadedImage> {
    let path = path.as_ref();
    let bytes = read_bytes(path)?;
    decode_image(&bytes, path, options)
}

/// Decodes an encoded image held in memory; `path` names it in errors.
pub fn decode_image(bytes: &[u8], path: &Path, options: &DecodeOptions) -> Result<LoadedImage> {
    let err = |reason: String| FeedbackError::Image {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.is_empty() {
        return Err(err("the file is empty".into()));
    }
    let format = image::guess_format(bytes).map_err(|_| {
        err("not an image: the file starts with no PNG, JPEG or WebP signature".into())
    })?;
    let format_name = match format {
        ImageFormat::Png => "PNG",
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::WebP => "WebP",
        other => {
            return Err(err(format!(
                "{other:?} images are not supported; convert to PNG (lossless) first"
            )))
        }
    };
    if format == ImageFormat::Jpeg {
        return decode_jpeg_file(bytes, path, options);
    }
    if format == ImageFormat::Png {
        check_png_palette(bytes).map_err(err)?;
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(options.max_pixels.saturating_mul(8).max(1 << 20));
    reader.limits(limits);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| err(format!("unreadable {format_name} header: {e}")))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(err(format!("{format_name} image has no pixels ({w}x{h})")));
    }
    if u64::from(w) * u64::from(h) > options.max_pixels {
        return Err(err(format!(
            "{w}x{h} is more than the {} pixels allowed (decompression bomb guard); {RAISE_PIXELS}",
            options.max_pixels
        )));
    }
    let orientation = if options.apply_exif_orientation {
        decoder.orientation().ok()
    } else {
        None
    };
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| {
        err(format!(
            "cannot decode the {format_name} data (truncated or damaged file?): {e}"
        ))
    })?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    let layout = format!("{format_name} {:?}", img.color());
    let (width, height) = (img.width(), img.height());
    let rgb = to_rgb8(img, options.grey16).map_err(err)?;
    Ok(LoadedImage {
        path: path.to_path_buf(),
        width,
        height,
        rgb,
        source_layout: layout,
    })
}

/// Refuses a PNG whose `PLTE` chunk is not 1 to 256 RGB triples, as
/// libpng (Pillow's decoder) does. The png crate panics on such a palette
/// (found by the `image_decode` fuzz target); only the chunks before the
/// first `IDAT` are walked.
fn check_png_palette(bytes: &[u8]) -> std::result::Result<(), String> {
    let mut pos = 8usize;
    while let Some(head) = bytes.get(pos..pos + 8) {
        let n = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        match &head[4..8] {
            b"PLTE" if n == 0 || n % 3 != 0 || n > 3 * 256 => {
                return Err(format!(
                    "invalid PNG palette (PLTE chunk of {n} bytes; a palette is 1 to 256 RGB \
                     triples): damaged file"
                ))
            }
            b"IDAT" | b"IEND" => break,
            _ => {}
        }
        match pos.checked_add(12).and_then(|p| p.checked_add(n)) {
            Some(next) => pos = next,
            None => break,
        }
    }
    Ok(())
}

fn decode_jpeg_file(bytes: &[u8], path: &Path, options: &DecodeOptions) -> Result<LoadedImage> {
    let err = |reason: String| FeedbackError::Image {
        path: path.to_path_buf(),
        reason,
    };
    // The limit is checked on the frame header, before any pixel memory is
    // allocated.
    let img = jpeg::decode_jpeg_limited(bytes, options.max_pixels).map_err(|e| {
        if e.contains("pixels allowed") {
            err(format!("{e}; {}", RAISE_PIXELS))
        } else {
            err(format!("cannot decode the JPEG data: {e}"))
        }
    })?;
    let (w, h) = (img.width as u32, img.height as u32);
    let (layout, rgb) = match img.pixels {
        JpegPixels::Grey(g) => ("JPEG L", g.iter().flat_map(|&v| [v, v, v]).collect()),
        JpegPixels::Rgb(rgb) => ("JPEG RGB", rgb),
        JpegPixels::Cmyk(cmyk) => ("JPEG CMYK", cmyk_to_rgb(&cmyk)),
    };
    let mut loaded = LoadedImage {
        path: path.to_path_buf(),
        width: w,
        height: h,
        rgb,
        source_layout: layout.into(),
    };
    if options.apply_exif_orientation {
        let orientation = ImageReader::with_format(Cursor::new(bytes), ImageFormat::Jpeg)
            .into_decoder()
            .and_then(|mut d| d.orientation())
            .unwrap_or(image::metadata::Orientation::NoTransforms);
        if orientation != image::metadata::Orientation::NoTransforms {
            let buf = image::RgbImage::from_raw(w, h, std::mem::take(&mut loaded.rgb))
                .ok_or_else(|| err("internal error: RGB buffer size".into()))?;
            let mut dynimg = DynamicImage::ImageRgb8(buf);
            dynimg.apply_orientation(orientation);
            loaded.width = dynimg.width();
            loaded.height = dynimg.height();
            loaded.rgb = dynimg.into_rgb8().into_raw();
        }
    }
    Ok(loaded)
}

/// Pillow's CMYK -> RGB of Adobe (inverted) CMYK samples `s`:
/// `r = (255 - k) - round(c * (255 - k) / 255)` with `c = 255 - s_c`,
/// `k = 255 - s_k` (`MULDIV255` rounding).
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    cmyk.chunks_exact(4)
        .flat_map(|p| {
            let nk = u32::from(p[3]);
            [0, 1, 2].map(|i| (nk - muldiv255(255 - u32::from(p[i]), nk)) as u8)
        })
        .collect()
}

/// Pillow's `alpha_composite` of one channel onto opaque white.
#[inline]
fn over_white(c: u8, a: u8) -> u8 {
    let (c, a) = (u32::from(c), u32::from(a));
    ((c * a + 255 * (255 - a) + 127) / 255) as u8
}

fn to_rgb8(img: DynamicImage, grey16: Grey16) -> std::result::Result<Vec<u8>, String> {
    let hi = |v: u16| (v >> 8) as u8;
    Ok(match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageRgba8(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [0, 1, 2].map(|i| over_white(p[i], p[3])))
            .collect(),
        DynamicImage::ImageLuma8(b) => b.into_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA8(b) => b
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| {
                let v = over_white(p[0], p[1]);
                [v, v, v]
            })
            .collect(),
        DynamicImage::ImageLuma16(b) => b
            .into_raw()
            .iter()
            .flat_map(|&v| {
                let v = match grey16 {
                    Grey16::ClipLikePillow => v.min(255) as u8,
                    Grey16::Scale => hi(v),
                };
                [v, v, v]
            })
            .collect(),
        DynamicImage::ImageLumaA16(b) => b
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| {
                let v = over_white(hi(p[0]), hi(p[1]));
                [v, v, v]
            })
            .collect(),
        DynamicImage::ImageRgb16(b) => b.into_raw().iter().map(|&v| hi(v)).collect(),
        DynamicImage::ImageRgba16(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [0, 1, 2].map(|i| over_white(hi(p[i]), hi(p[3]))))
            .collect(),
        other => {
            return Err(format!(
                "{:?} pixels cannot be converted to 8-bit RGB",
                other.color()
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_matches_pillow_corners() {
        assert_eq!(over_white(0, 0), 255);
        assert_eq!(over_white(0, 255), 0);
        assert_eq!(over_white(200, 255), 200);
        // round((100 * 128 + 255 * 127) / 255) = round(177.2) = 177
        assert_eq!(over_white(100, 128), 177);
    }

    #[test]
    fn rejects_non_images() {
        let e = decode_image(
            b"hello world",
            Path::new("x.png"),
            &DecodeOptions::default(),
        );
        let msg = e.expect_err("text is not an image").to_string();
        assert!(
            msg.contains("x.png") && msg.contains("not an image"),
            "{msg}"
        );
        let e = decode_image(b"", Path::new("empty.jpg"), &DecodeOptions::default());
        assert!(e.expect_err("empty").to_string().contains("empty"));
    }
}
