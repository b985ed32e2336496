//! Developer check of the JPEG decoder against Pillow on any folder of
//! JPEGs: for every `X.jpg` with a sibling `X.jpg.rgb` (the `H x W x 3`
//! bytes of `transformers.image_transforms.convert_to_rgb(Image.open(X),
//! return_numpy=True)`), decoding must match exactly.
//!
//!     AGFSYNC_JPEG_DIR=/path cargo test -p agfsync-feedback --test jpeg_folder -- --ignored

use agfsync_feedback::image_input::{load_image, DecodeOptions};

#[test]
#[ignore = "needs AGFSYNC_JPEG_DIR with Pillow references"]
fn jpegs_decode_like_pillow() -> anyhow::Result<()> {
    let dir = std::env::var("AGFSYNC_JPEG_DIR")?;
    let mut checked = 0;
    let mut bad = Vec::new();
    for e in std::fs::read_dir(&dir)? {
        let p = e?.path();
        if p.extension().and_then(|x| x.to_str()) != Some("jpg") {
            continue;
        }
        let Ok(want) = std::fs::read(p.with_extension("jpg.rgb")) else {
            continue;
        };
        checked += 1;
        match load_image(&p, &DecodeOptions::default()) {
            Ok(img) if img.rgb == want => {}
            Ok(img) => {
                let n = img.rgb.iter().zip(&want).filter(|(a, b)| a != b).count();
                bad.push(format!(
                    "{}: {n} bytes differ ({})",
                    p.display(),
                    img.source_layout
                ));
            }
            Err(e) => bad.push(format!("{}: {e}", p.display())),
        }
    }
    assert!(checked > 0, "no X.jpg + X.jpg.rgb pairs in {dir}");
    assert!(
        bad.is_empty(),
        "{} of {checked} differ:\n{}",
        bad.len(),
        bad.join("\n")
    );
    eprintln!("{checked} JPEGs decode exactly like Pillow");
    Ok(())
}
