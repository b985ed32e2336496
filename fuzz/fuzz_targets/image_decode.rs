//! Candidate and pair images: PNG and WebP through the image crate, JPEG
//! through our libjpeg-turbo-exact decoder, converted to RGB as Pillow does,
//! under a pixel limit.
#![no_main]

use std::path::Path;

use agfsync_feedback::image_input::{decode_image, DecodeOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let opts = DecodeOptions {
        apply_exif_orientation: flags & 1 == 1,
        max_pixels: 1 << 20,
        ..DecodeOptions::default()
    };
    if let Ok(img) = decode_image(rest, Path::new("fuzz.img"), &opts) {
        assert_eq!(img.rgb.len(), img.width as usize * img.height as usize * 3);
        assert!(u64::from(img.width) * u64::from(img.height) <= opts.max_pixels);
    }
});
