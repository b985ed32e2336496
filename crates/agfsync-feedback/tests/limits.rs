//! Resource bounds on images: a size over the pixel limit is refused from
//! the header, before pixel memory is allocated, with an error that names
//! the limit and how to raise it.

use std::path::Path;

use agfsync_feedback::image_input::{decode_image, DecodeOptions};

/// SOI and a baseline frame header of `w` x `h`, three components: what a
/// decoder sees before any pixel data.
fn jpeg_header(w: u16, h: u16) -> Vec<u8> {
    let mut b = vec![0xFF, 0xD8, 0xFF, 0xC0, 0, 17, 8];
    b.extend_from_slice(&h.to_be_bytes());
    b.extend_from_slice(&w.to_be_bytes());
    b.push(3);
    for id in 1..=3u8 {
        b.extend_from_slice(&[id, 0x11, 0]);
    }
    b.extend_from_slice(&[0xFF, 0xD9]);
    b
}

#[test]
fn jpeg_bomb_header_is_refused_before_decoding() {
    // 65535 x 65535 (4.3 Gpx) in 25 bytes: before the fix the decoder
    // allocated its coefficient planes (8 GiB each) before the pixel check.
    let err = decode_image(
        &jpeg_header(65535, 65535),
        Path::new("bomb.jpg"),
        &DecodeOptions::default(),
    )
    .expect_err("a 4.3 Gpx JPEG must be refused")
    .to_string();
    assert!(err.contains("65535x65535"), "{err}");
    assert!(err.contains("178956970 pixels allowed"), "{err}");
    assert!(err.contains("max_image_pixels"), "{err}");
    assert!(err.contains("--max-pixels"), "{err}");
}

#[test]
fn image_over_a_configured_pixel_limit_is_refused() {
    let opts = DecodeOptions {
        max_pixels: 100,
        ..DecodeOptions::default()
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity/feedback/images");
    for f in ["rgb_square32.png", "photo.jpg", "lossless.webp"] {
        let bytes = std::fs::read(root.join(f)).expect("fixture");
        let err = decode_image(&bytes, Path::new(f), &opts)
            .expect_err("over 100 pixels")
            .to_string();
        assert!(err.contains("100 pixels allowed"), "{f}: {err}");
        assert!(err.contains("max_image_pixels"), "{f}: {err}");
        // The default limit reads the same file.
        assert!(decode_image(&bytes, Path::new(f), &DecodeOptions::default()).is_ok());
    }
}

/// Inputs the `image_decode` fuzz target found crashing, kept as
/// regression tests (fuzz/ and docs/reliability.md).
mod fuzz_regressions {
    use super::*;

    fn decode(bytes: &[u8]) -> Result<(), String> {
        decode_image(bytes, Path::new("fuzz.jpg"), &DecodeOptions::default())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn jpeg_dc_category_over_15_does_not_panic() {
        // A DC Huffman table whose symbol asks for 127 extra bits: the
        // decoder shifted by more than 31 and panicked.
        let err = decode(include_bytes!(
            "fuzz_regressions/jpeg_dc_category_over_15.jpg"
        ))
        .expect_err("a DC category over 15 is invalid");
        assert!(err.contains("DC category"), "{err}");
    }
}

mod fuzz_regressions_png {
    use super::*;

    #[test]
    fn png_palette_not_rgb_triples_does_not_panic() {
        // A PLTE chunk of 2 bytes: the png crate's palette expansion sliced
        // past its end and panicked.
        let err = decode_image(
            include_bytes!("fuzz_regressions/png_palette_not_rgb_triples.png"),
            Path::new("fuzz.png"),
            &DecodeOptions::default(),
        )
        .expect_err("a 2-byte palette is invalid")
        .to_string();
        assert!(err.contains("PLTE"), "{err}");
    }
}
